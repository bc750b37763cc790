import pytest
import torch
from transformers import DynamicCache

from envs.cache_kwarg import cache_keyword, with_cache
from envs.scoring import (
    batched_continuation_logprobs,
    can_pack,
    choose,
    continuation_logprobs,
    encode_pair,
    score_requests,
)
from quant.kv_cache import MixedPrecisionKVCache

ENDINGS = [" is ripping level tiles off.", " starts pulling up roofing.", " the end", " x"]


def test_encode_pair_splits_joint_encoding(tiny_model):
    _, tok = tiny_model
    ctx, cont = encode_pair(tok, "A man sat on the", " thing")
    assert ctx + cont == tok.encode("A man sat on the thing")
    assert ctx == tok.encode("A man sat on the")
    # trailing context whitespace moves into the continuation (" the" stays one merged token)
    ctx2, cont2 = encode_pair(tok, "A man sat on ", "the thing")
    assert ctx2 == tok.encode("A man sat on") and tok.decode(cont2) == " the thing"
    assert tok.convert_ids_to_tokens(cont2)[0] == "Ġthe"
    with pytest.raises(ValueError, match="context"):
        encode_pair(tok, "", "x")


def _one_at_a_time(model, prefix, cont):
    ids = torch.tensor([prefix + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(float(lp[len(prefix) - 1 + j, t]) for j, t in enumerate(cont))


def test_batched_equals_unbatched(tiny_model):
    model, tok = tiny_model
    prefix = tok.encode("Roof shingle removal: A man is sitting on a roof. he")
    conts = [tok.encode(e) for e in ENDINGS]
    batched = continuation_logprobs(model, prefix, conts)
    expected = [_one_at_a_time(model, prefix, c) for c in conts]
    assert batched == pytest.approx(expected, abs=1e-4)
    # mixed prefixes in one forward (several items per batch) agree too
    other = tok.encode("Another prompt")
    mixed = score_requests(model, [(prefix, conts[0]), (other, conts[1])])
    assert mixed == pytest.approx([expected[0], _one_at_a_time(model, other, conts[1])], abs=1e-4)


def test_cache_path_matches_full_forward(tiny_model):
    model, tok = tiny_model
    prefix = tok.encode("Some boys are in a room joking and playing around. when they")
    conts = [tok.encode(e) for e in ENDINGS]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(torch.tensor([prefix]), **with_cache(model, cache), use_cache=True)
    cache.batch_repeat_interleave(len(conts))
    cached = continuation_logprobs(model, prefix, conts, cache=cache, prefix_last_logits=out.logits[0, -1])
    assert cached == pytest.approx(continuation_logprobs(model, prefix, conts), abs=1e-4)
    with pytest.raises(ValueError, match="prefix_last_logits"):
        continuation_logprobs(model, prefix, conts, cache=cache)


def test_packed_row_matches_full_forward_and_one_row_per_continuation(tiny_model):
    """A cache of batch 1: every continuation in one row (own positions, block-diagonal mask)."""
    model, tok = tiny_model
    prefix = tok.encode("Some boys are in a room joking and playing around. when they")
    conts = [tok.encode(e) for e in ENDINGS] + [tok.encode(" y")[:1]]  # one of a single token
    assert len(conts[-1]) == 1 and len({len(c) for c in conts}) > 2  # ragged: packing must not pad

    def prefilled(rows):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(torch.tensor([prefix]), **with_cache(model, cache), use_cache=True)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache, out.logits[0, -1]

    cache, last = prefilled(1)
    packed = continuation_logprobs(model, prefix, conts, cache=cache, prefix_last_logits=last)
    assert cache.get_seq_length() == len(prefix) + sum(len(c) - 1 for c in conts)  # appended, as documented
    cache, last = prefilled(len(conts))
    rows = continuation_logprobs(model, prefix, conts, cache=cache, prefix_last_logits=last)
    assert packed == pytest.approx(rows, abs=1e-4)
    assert packed == pytest.approx([_one_at_a_time(model, prefix, c) for c in conts], abs=1e-4)
    assert can_pack(model)


def _mixed_prefilled(model, prefix, commit_bits=None):
    """A MixedPrecisionKVCache holding ``prefix`` (committed at ``commit_bits``, else pending) and the
    logits at its last position."""
    cache = MixedPrecisionKVCache(model.config.num_hidden_layers)
    with torch.no_grad():
        out = model(torch.tensor([prefix]), **with_cache(model, cache), use_cache=True)
    if commit_bits is not None:
        cache.commit(commit_bits)
    return cache, out.logits[0, -1]


@pytest.mark.parametrize("commit_bits", [None, 16, 4])
def test_batched_rows_equal_one_row_at_a_time(tiny_model, commit_bits):
    """Several prefixes of different lengths, each against its own cache, in one padded forward: the
    same scores as each row packed alone (float noise), and a row whose continuations are all one
    token long sits out."""
    model, tok = tiny_model
    prefixes = [
        tok.encode("Some boys are in a room joking and playing around. when they"),
        tok.encode("A woman"),
        tok.encode("The man takes the dog for a walk in the park and then"),
    ]
    rows = [
        [tok.encode(e) for e in ENDINGS],
        [tok.encode(e) for e in ENDINGS[:2]] + [tok.encode(" y")[:1]],
        [tok.encode(" y")[:1], tok.encode(" z")[:1]],  # nothing after the first token: no new tokens
    ]
    alone = []
    for prefix, conts in zip(prefixes, rows, strict=True):
        cache, last = _mixed_prefilled(model, prefix, commit_bits)
        alone.append(continuation_logprobs(model, prefix, conts, cache=cache, prefix_last_logits=last))
    built = [_mixed_prefilled(model, prefix, commit_bits) for prefix in prefixes]
    caches = [cache for cache, _ in built]
    batched = batched_continuation_logprobs(model, caches, prefixes, rows, [last for _, last in built])
    for got, want in zip(batched, alone, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    appended = [sum(len(c) - 1 for c in conts) for conts in rows]
    assert [c.get_seq_length() for c in caches] == [len(p) + n for p, n in zip(prefixes, appended, strict=True)]
    with pytest.raises(ValueError, match="prefix has"):
        batched_continuation_logprobs(model, caches, prefixes, rows, [last for _, last in built])


def test_models_with_sliding_windows_are_not_packed(tiny_model):
    model, tok = tiny_model
    config = model.config.__class__(**{**model.config.to_dict(), "sliding_window": 16})
    windowed = type("Windowed", (), {"config": config})()
    assert not can_pack(windowed)
    prefix = tok.encode("short prompt")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(torch.tensor([prefix]), **with_cache(model, cache), use_cache=True)
    with pytest.raises(ValueError, match="sliding-window"):
        continuation_logprobs(windowed, prefix, [[3, 4], [5, 6]], cache=cache, prefix_last_logits=out.logits[0, -1])


def test_cache_batch_mismatch_is_reported(tiny_model):
    model, tok = tiny_model
    prefix = tok.encode("short prompt")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(torch.tensor([prefix]), **with_cache(model, cache), use_cache=True)
    cache.batch_repeat_interleave(3)
    with pytest.raises(ValueError, match="expand"):
        continuation_logprobs(model, prefix, [[5, 6], [7, 8]], cache=cache, prefix_last_logits=out.logits[0, -1])


def test_empty_continuation_rejected(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError):
        continuation_logprobs(model, [1, 2], [[3], []])


def test_choose_normalises_by_ending_characters():
    # raw argmax picks the short ending; per character the long one wins
    assert choose([-4.0, -6.0], ["ab", "abcdefgh"]) == (0, 1)
    assert choose([-1.0, -1.0], ["x", "y"]) == (0, 0)  # ties go to the first, like np.argmax
    with pytest.raises(ValueError):
        choose([-1.0], ["a", "b"])


def test_the_model_reads_the_cache_we_pass(tiny_model):
    """Fails whenever our keyword is not the one ``forward`` reads (the model would use a fresh cache)."""
    from quant.kv_cache import MixedPrecisionKVCache

    model, tok = tiny_model
    prefix, rest = tok.encode("A man is sitting on a roof."), tok.encode(" He starts")
    cache = MixedPrecisionKVCache(config=model.config, group_size=16)
    with torch.no_grad():
        model(torch.tensor([prefix]), **with_cache(model, cache), use_cache=True)
        assert cache.get_seq_length() == len(prefix)
        cached = model(torch.tensor([rest]), **with_cache(model, cache), use_cache=True).logits[0]
        full = model(torch.tensor([prefix + rest])).logits[0, len(prefix):]
        alone = model(torch.tensor([rest])).logits[0]
    assert cache.get_seq_length() == len(prefix) + len(rest)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cached, alone, atol=1e-2)
    assert cache_keyword(model) in ("cache", "past_key_values")


def test_cache_keyword_follows_the_forward_signature():
    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class Neither(torch.nn.Module):
        def forward(self, input_ids=None, **kwargs): ...

    assert with_cache(New(), 1) == {"cache": 1} and with_cache(Old(), 1) == {"past_key_values": 1}
    with pytest.raises(TypeError, match="ignore"):
        cache_keyword(Neither())
