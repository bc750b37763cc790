"""Tests for quant.baselines: the transformers QuantizedCache (quanto backend) and KV byte counting."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny_llama import tiny_llama
from transformers import DynamicCache, QuantizedCache

from envs.cache_kwarg import with_cache
from quant.baselines import (
    DynamicKVCache,
    QuantoKVCache,
    check_cache_bits,
    episode_cache,
    kv_cache_nbytes,
    quanto_cache,
)
from quant.kv_cache import MixedPrecisionKVCache

N_LAYERS, N_KV_HEADS, HEAD_DIM = 2, 2, 16  # tiny Llama below: hidden 64 / 4 heads, 2 KV heads
GROUP = 32  # must divide N_KV_HEADS * HEAD_DIM = 32
FLOAT = 4  # bytes per float32 element


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def prompt(length: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(2))


def run(model, ids: torch.Tensor, cache, decode_steps: int = 0) -> torch.Tensor:
    """Prefill ``ids`` into ``cache``, then feed ``decode_steps`` more tokens one at a time; last logits."""
    with torch.no_grad():
        out = model(ids, **with_cache(model, cache), use_cache=True)
        for _ in range(decode_steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, **with_cache(model, cache), use_cache=True)
    return out.logits[:, -1]


def quantized_bytes(tokens: int, nbits: int) -> int:
    """Hand count for one quantized K (or V) tensor: packed codes + float32 scale and shift per group."""
    elements = N_KV_HEADS * tokens * HEAD_DIM
    return elements * nbits // 8 + 2 * (elements // GROUP) * FLOAT


def test_quanto_cache_is_a_quantized_cache(model):
    cache = quanto_cache(model, 4, q_group_size=GROUP)
    assert isinstance(cache, QuantizedCache) and len(cache.layers) == N_LAYERS
    assert quanto_cache(model.config, 2, q_group_size=GROUP).layers[0].nbits == 2


@pytest.mark.parametrize("nbits", [0, 3, 8, 16])
def test_invalid_nbits_rejected(model, nbits):
    with pytest.raises(ValueError, match="nbits"):
        quanto_cache(model, nbits)


def test_bad_group_size_and_bad_target_rejected(model):
    with pytest.raises(ValueError, match="does not divide"):
        quanto_cache(model, 4, q_group_size=64)  # 64 does not divide 2 heads * 16 dims
    with pytest.raises(ValueError, match="PreTrainedConfig"):
        quanto_cache(torch.nn.Linear(2, 2), 4)


@pytest.mark.parametrize("nbits", [2, 4])
def test_generate_with_quanto_cache(model, nbits):
    ids = prompt(20)
    out = model.generate(
        ids,
        max_new_tokens=6,
        do_sample=False,
        **with_cache(model, quanto_cache(model, nbits, q_group_size=GROUP, residual_length=4)),
    )
    assert out.shape == (1, 26) and torch.equal(out[:, :20], ids)


def test_more_bits_means_closer_to_full_precision(model):
    ids = prompt(150)
    ref = run(model, ids, DynamicCache(config=model.config), decode_steps=3)
    errors = {}
    for nbits in (2, 4):
        logits = run(model, ids, quanto_cache(model, nbits, q_group_size=GROUP), decode_steps=3)
        assert torch.isfinite(logits).all()
        errors[nbits] = ((logits - ref).norm() / ref.norm()).item()
    assert 0 < errors[4] < errors[2]


@pytest.mark.parametrize("nbits", [2, 4])
def test_kv_cache_nbytes_matches_hand_count_and_beats_dynamic(model, nbits):
    prefill, decode = 200, 3  # the prefill (> residual_length) is quantized; decoded tokens stay in float
    ids = prompt(prefill)
    cache = quanto_cache(model, nbits, q_group_size=GROUP, residual_length=128)
    run(model, ids, cache, decode_steps=decode)
    assert cache.get_seq_length() == prefill + decode
    residual = 2 * N_KV_HEADS * decode * HEAD_DIM * FLOAT  # keys + values in float32
    expected = N_LAYERS * (2 * quantized_bytes(prefill, nbits) + residual)
    assert kv_cache_nbytes(cache) == expected

    dynamic = DynamicCache(config=model.config)
    run(model, ids, dynamic, decode_steps=decode)
    dynamic_bytes = N_LAYERS * 2 * N_KV_HEADS * (prefill + decode) * HEAD_DIM * FLOAT
    assert kv_cache_nbytes(dynamic) == dynamic_bytes
    assert kv_cache_nbytes(cache) < dynamic_bytes


def test_kv_cache_nbytes_after_residual_flush(model):
    """Once the float residual fills up, everything is re-quantized and the residual is emptied."""
    cache = quanto_cache(model, 4, q_group_size=GROUP, residual_length=4)
    run(model, prompt(64), cache, decode_steps=4)  # 4th decoded token triggers the flush
    assert cache.layers[0].keys.numel() == 0
    assert kv_cache_nbytes(cache) == N_LAYERS * 2 * quantized_bytes(64 + 4, 4)


def test_kv_cache_nbytes_uses_own_nbytes_and_rejects_non_caches():
    class OwnCount:
        def nbytes(self) -> int:
            return 123

    assert kv_cache_nbytes(OwnCount()) == 123
    with pytest.raises(ValueError, match="Cache"):
        kv_cache_nbytes(object())


# --- the env's cache backends ---------------------------------------------------------------------
def _prefill(model, cache, ids: torch.Tensor, block: int = 16) -> torch.Tensor:
    with torch.no_grad():
        for start in range(0, ids.shape[1], block):
            out = model(ids[:, start : start + block], **with_cache(model, cache), use_cache=True)
    return out.logits[0, -1]


def test_episode_cache_kinds_and_their_bit_menus(model):
    assert isinstance(episode_cache("mixed", model, (2, 4, 8, 16), GROUP), MixedPrecisionKVCache)
    assert isinstance(episode_cache("quanto", model, (4,), GROUP), QuantoKVCache)
    assert isinstance(episode_cache("dynamic", model, (16,), GROUP), DynamicKVCache)
    with pytest.raises(ValueError, match="nbits"):
        check_cache_bits("quanto", (2, 4))  # quanto's width is fixed: a menu cannot be honoured
    with pytest.raises(ValueError, match="nbits"):
        check_cache_bits("quanto", (8,))
    with pytest.raises(ValueError, match=r"\[16\]"):
        check_cache_bits("dynamic", (4, 16))
    with pytest.raises(ValueError, match="cache must be one of"):
        check_cache_bits("hqq", (4,))


def test_quanto_commit_books_blocks_and_counts_like_the_baseline(model):
    cache = quanto_cache(model, 4, q_group_size=GROUP, residual_length=128)
    _prefill(model, cache, prompt(40), block=16)  # 40 tokens, uncommitted: nothing booked yet
    assert cache.pending_length == 40 and cache.nbytes(False) == 0 and math.isnan(cache.average_bits())
    cache.commit(4)
    assert cache.block_bits == [(4, 40)] and cache.pending_length == 0
    assert cache.nbytes(False) == cache.nbytes() == kv_cache_nbytes_of_layers(cache)
    assert cache.fp16_nbytes(False) == N_LAYERS * 2 * N_KV_HEADS * HEAD_DIM * 2 * 40
    residual = 40 - 16  # the first block (the prefill) was quantized; the rest waits in float
    assert cache.average_bits() == pytest.approx(4 * (16 / 40) + 16 * (residual / 40))
    with pytest.raises(ValueError, match="stores"):
        cache.commit(2)
    with pytest.raises(ValueError, match="nothing pending"):
        cache.commit(4)


def kv_cache_nbytes_of_layers(cache) -> int:
    class Layers:  # kv_cache_nbytes' own count, without the cache's nbytes()
        layers = cache.layers

    return kv_cache_nbytes(Layers())


@pytest.mark.parametrize("kind, bits", [("quanto", (4,)), ("dynamic", (16,))])
def test_branch_scores_from_the_prefix_and_restores_it(model, kind, bits):
    ids, nxt = prompt(40), torch.tensor([[7, 8, 9]])
    cache = episode_cache(kind, model, bits, GROUP)
    _prefill(model, cache, ids)
    cache.commit(bits[0])
    held, length = cache.nbytes(), cache.get_seq_length()
    with torch.no_grad():
        with cache.branch(1):
            first = model(nxt, **with_cache(model, cache)).logits
            assert cache.get_seq_length() == length + 3
        assert cache.get_seq_length() == length and cache.nbytes() == held
        with cache.branch(1):
            again = model(nxt, **with_cache(model, cache)).logits
        fresh = episode_cache(kind, model, bits, GROUP)
        _prefill(model, fresh, ids)
        expected = model(nxt, **with_cache(model, fresh)).logits
    assert torch.equal(first, again) and torch.equal(first, expected)


def test_quanto_cannot_branch_along_the_batch_but_dynamic_can(model):
    quanto = episode_cache("quanto", model, (4,), GROUP)
    with pytest.raises(ValueError, match="branches"), quanto.branch(2):
        pass
    dynamic = episode_cache("dynamic", model, (16,), GROUP)
    _prefill(model, dynamic, prompt(20))
    with torch.no_grad(), dynamic.branch(2):
        two = model(torch.tensor([[5, 6], [5, 6]]), **with_cache(model, dynamic)).logits
    with torch.no_grad(), dynamic.branch(1):
        one = model(torch.tensor([[5, 6]]), **with_cache(model, dynamic)).logits
    torch.testing.assert_close(two[1:], one)
    assert dynamic.get_seq_length() == 20
