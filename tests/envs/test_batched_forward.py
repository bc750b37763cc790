"""envs.batched_forward: the padding-free forward (rows side by side in one sequence, attention by row or all
rows together) gives what the right-padded forward gives: every row's logits, its attention maps and what its
cache holds after, for causal blocks, packed continuations and a row sitting out, on two architectures (each
has its own eager attention, which the padding-free forward calls)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import envs.batched_forward as batched_forward
from envs.batched_forward import RowTokens, forward_rows, packs_rows
from envs.cache_kwarg import with_cache
from envs.scoring import PackedRow
from quant.kv_cache import MixedPrecisionKVCache

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=512)


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SIZES, attn_implementation="eager"))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, attn_implementation="eager"))
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return _model(request.param)


def _caches(model, histories: list[int]) -> list[MixedPrecisionKVCache]:
    """One cache per row, each holding a random history of its own length (committed at 4 bits but its last
    tokens), the same every call."""
    generator = torch.Generator().manual_seed(1)
    caches = []
    for n in histories:
        cache = MixedPrecisionKVCache(config=model.config, group_size=16, sink_tokens=2, keep_dequantized=True)
        ids = torch.randint(0, 256, (1, n), generator=generator)
        with torch.inference_mode():
            model(input_ids=ids, **with_cache(model, cache), use_cache=True)
        cache.commit(4)
        caches.append(cache)
    return caches


def _rows() -> list[RowTokens]:
    """A full block, a short block, packed continuations, a row sitting out, another block."""
    generator = torch.Generator().manual_seed(2)
    ids = lambda n: torch.randint(0, 256, (n,), generator=generator).tolist()  # noqa: E731
    packed = PackedRow.of([ids(5), ids(9), ids(3)], "cpu")
    return [RowTokens(ids(16)), RowTokens(ids(7)), RowTokens(packed.tokens, packed.local, packed.visible),
            RowTokens([]), RowTokens(ids(16))]


HISTORIES = [40, 8, 33, 20, 64]


def _run(model, monkeypatch, layout: str):
    """Two forwards through the same caches (the second reads what the first appended): each's output."""
    monkeypatch.setattr(batched_forward, "ATTEND_BY_ROW", layout == "by-row")
    monkeypatch.setattr(batched_forward, "packs_rows", lambda m: layout != "padded" and packs_rows(m))
    caches, outs = _caches(model, HISTORIES), []
    with torch.inference_mode():
        for _ in range(2):
            outs.append(forward_rows(model, caches, _rows(), output_attentions=True))
    return outs


@pytest.mark.parametrize("layout", ["by-row", "together"])
def test_padding_free_equals_padded(model, monkeypatch, layout):
    padded, free = _run(model, monkeypatch, "padded"), _run(model, monkeypatch, layout)
    assert len(free[0].groups) == (len(HISTORIES) if layout == "by-row" else 1)
    for want, got in zip(padded, free, strict=True):
        assert got.past == want.past
        for r, row in enumerate(_rows()):
            torch.testing.assert_close(got.logits[r], want.logits[r], atol=1e-5, rtol=1e-5)
            if row.ids:
                for a, b in zip(got.row_maps(r), want.row_maps(r), strict=True):
                    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert free[1].logits[3].shape[0] == 0  # the row that sat out has no logits


@pytest.mark.parametrize("layout", ["by-row", "padded"])
def test_runs_join_the_rows_whose_logits_lie_back_to_back(model, monkeypatch, layout):
    """RowsOutput.runs: the rows asked for, cut where their logits stop lying back to back (a row left out of
    the ask; right-padded, also a row shorter than the widest), each run's logits the rows' own, joined."""
    out = _run(model, monkeypatch, layout)[0]
    blocks = [0, 1, 4]  # _rows(): the packed row (2) and the row sitting out (3) are not asked for
    runs = out.runs(blocks)
    assert [run for run, _ in runs] == [[0, 1], [4]]  # row 0 is full width, so row 1 follows it in either layout
    for run, logits in runs:
        torch.testing.assert_close(logits, torch.cat([out.logits[r] for r in run]), atol=0, rtol=0)
    # every row: right-padded, the short block (7 of 16 tokens) and the packed row (14) end before the next starts
    assert [run for run, _ in out.runs(range(5))] == ([[0, 1, 2, 3, 4]] if layout != "padded" else
                                                      [[0, 1], [2], [3], [4]])


def test_the_models_attention_is_restored(model):
    """The forward names rows_attention in the model's config for its own duration only, even when it fails."""
    caches = _caches(model, [8, 8])
    with torch.inference_mode():
        forward_rows(model, caches, [RowTokens([1, 2, 3]), RowTokens([4])])
        assert model.config._attn_implementation == "eager"
        with pytest.raises(IndexError):
            forward_rows(model, caches, [RowTokens([1, 2, 10_000]), RowTokens([4])])  # an id past the vocabulary
    assert model.config._attn_implementation == "eager"


def test_only_eager_models_run_padding_free():
    model = _model("llama")
    assert packs_rows(model)
    model.set_attn_implementation("sdpa")
    assert not packs_rows(model)
