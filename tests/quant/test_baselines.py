"""Tests for quant.baselines: the transformers QuantizedCache (quanto backend) and KV byte counting."""

from __future__ import annotations

import pytest
import torch
from _tiny_llama import tiny_llama
from transformers import DynamicCache, QuantizedCache

from quant.baselines import kv_cache_nbytes, quanto_cache

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
        out = model(ids, past_key_values=cache, use_cache=True)
        for _ in range(decode_steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, past_key_values=cache, use_cache=True)
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
        past_key_values=quanto_cache(model, nbits, q_group_size=GROUP, residual_length=4),
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
