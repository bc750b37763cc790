"""MixedPrecisionKVCache against hand-built references on a tiny random Llama (and once on SmolLM2)."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny_llama import tiny_llama
from transformers import DynamicCache

from envs.cache_kwarg import with_cache
from quant.kv_cache import MixedPrecisionKVCache
from quant.uniform import dequantize, quantize

GROUP = 64


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(1))
    return model, ids


def _run_blocks(model, cache, ids, blocks, bits):
    """Feed ``ids`` block by block, committing block i at ``bits[i]`` (None: leave it pending)."""
    start, logits = 0, None
    with torch.no_grad():
        for size, b in zip(blocks, bits, strict=True):
            logits = model(ids[:, start : start + size], **with_cache(model, cache)).logits
            if b is not None:
                cache.commit(b)
            start += size
    return logits


def _reference_blocks(model, ids, blocks, bits):
    """The same computation by hand: a DynamicCache whose just-run block is replaced by its
    quantize/dequantize round trip (keys per channel over tokens, values per token)."""
    cache, start, logits = DynamicCache(), 0, None
    with torch.no_grad():
        for size, b in zip(blocks, bits, strict=True):
            logits = model(ids[:, start : start + size], **with_cache(model, cache)).logits
            if b is not None:
                for layer in cache.layers:
                    for name, axis in (("keys", -2), ("values", -1)):
                        block = getattr(layer, name)[..., start : start + size, :]
                        block.copy_(dequantize(quantize(block, b, axis=axis, group_size=GROUP)))
            start += size
    return logits


def test_all_16_bit_blocks_match_dynamic_cache(tiny):
    model, ids = tiny
    blocks = (64, 64, 64, 20)
    ours = _run_blocks(model, MixedPrecisionKVCache(config=model.config), ids, blocks, (16, 16, 16, None))
    with torch.no_grad():
        full = model(ids[:, : sum(blocks)]).logits[:, -blocks[-1] :]
    assert torch.allclose(ours, full, atol=1e-3, rtol=0)  # fp16 storage of K/V is the only difference


@pytest.mark.parametrize(
    ("blocks", "bits"),
    [
        ((64, 64, 64, 64, 64, 30), (4, 2, 8, 16, 3, None)),  # every width, then a pending block
        ((64, 64, 30, 64, 17), (4, 4, 2, 2, None)),  # merged same-bits segments, a partial group
        ((40, 64, 64), (8, 8, None)),  # a partial key group that must not be merged into
    ],
)
def test_mixed_blocks_match_a_hand_computed_reference(tiny, blocks, bits):
    model, ids = tiny
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP)
    ours = _run_blocks(model, cache, ids, blocks, bits)
    reference = _reference_blocks(model, ids, blocks, bits)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)
    # ... and the quantization really changed the logits (otherwise the comparison proves nothing).
    with torch.no_grad():
        full = model(ids[:, : sum(blocks)]).logits[:, -blocks[-1] :]
    assert (ours - full).abs().max() > 1e-4  # 10x the tolerance above, even with 8-bit blocks only
    committed = [(b, n) for n, b in zip(blocks, bits, strict=True) if b is not None]
    assert cache.block_bits == committed
    assert cache.committed_length == sum(n for _, n in committed)
    assert cache.pending_length == (blocks[-1] if bits[-1] is None else 0)
    assert cache.get_seq_length() == sum(blocks)
    assert cache.average_bits() == pytest.approx(
        sum(b * n for b, n in committed) / sum(n for _, n in committed)
    )


def _hand_nbytes(blocks, bits, heads=2, head_dim=16, layers=2):
    """Storage by hand: packed codes + fp16 scale and zero per group, fp32 pending tokens."""
    per_layer, run_bits, run_len = 0, None, 0
    segments = []  # consecutive same-bits blocks merge only when the keys end on a whole group
    for n, b in zip(blocks, bits, strict=True):
        if b is None:
            continue
        if b == run_bits and run_len % GROUP == 0:
            run_len += n
        else:
            if run_bits is not None:
                segments.append((run_bits, run_len))
            run_bits, run_len = b, n
    segments.append((run_bits, run_len))
    for b, n in segments:
        if b == 16:
            per_layer += 2 * (2 * heads * n * head_dim)
            continue
        per_byte = {2: 4, 3: 1, 4: 2, 8: 1}[b]
        codes = heads * n * math.ceil(head_dim / per_byte)
        key_groups = heads * math.ceil(n / GROUP) * head_dim
        value_groups = heads * n * math.ceil(head_dim / GROUP)
        per_layer += 2 * codes + 4 * (key_groups + value_groups)
    pending = blocks[-1] if bits[-1] is None else 0
    per_layer += 2 * heads * pending * head_dim * 4
    return layers * per_layer


def test_nbytes_is_the_hand_count(tiny):
    model, ids = tiny
    blocks, bits = (64, 64, 30, 64, 64, 17), (4, 4, 2, 8, 16, None)
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP)
    _run_blocks(model, cache, ids, blocks, bits)
    assert cache.nbytes() == _hand_nbytes(blocks, bits)
    assert cache.nbytes(include_pending=False) == _hand_nbytes(blocks[:-1], bits[:-1])
    assert cache.fp16_nbytes() == 2 * 2 * 2 * 16 * 2 * sum(blocks)  # layers * (K,V) * heads * dim * fp16
    assert cache.nbytes(include_pending=False) < cache.fp16_nbytes(include_pending=False)


def test_generate_with_the_cache_and_the_policy_hook(tiny):
    model, ids = tiny
    prompt = ids[:, :20]
    choices = iter([2, 4, 8, 16, 4, 2])
    seen_pending = []

    def policy(cache):
        seen_pending.append(cache.pending_length)
        return next(choices)

    cache = MixedPrecisionKVCache(config=model.config, policy=policy, interval=8)
    with torch.no_grad():
        out = model.generate(prompt, **with_cache(model, cache), max_new_tokens=30, do_sample=False)
    assert out.shape == (1, 50)
    # The prompt (20 pending tokens) is committed before the first decode step, then every 8 tokens.
    assert cache.block_bits == [(2, 20), (4, 8), (8, 8), (16, 8)]
    assert seen_pending == [20, 8, 8, 8]
    assert cache.get_seq_length() == 49 and cache.pending_length == 5

    # At 16 bits the tokens are those of an ordinary (DynamicCache) greedy run.
    sixteen = MixedPrecisionKVCache(config=model.config, policy=lambda c: 16, interval=8)
    with torch.no_grad():
        ours = model.generate(prompt, **with_cache(model, sixteen), max_new_tokens=30, do_sample=False)
        plain = model.generate(prompt, max_new_tokens=30, do_sample=False)
    assert torch.equal(ours, plain)


def _prefixed_cache(model, ids):
    cache = MixedPrecisionKVCache(config=model.config)
    _run_blocks(model, cache, ids, (64, 64, 10), (4, 2, None))
    return cache


def test_branch_leaves_the_cache_exactly_as_before(tiny):
    model, ids = tiny
    branched, untouched = _prefixed_cache(model, ids), _prefixed_cache(model, ids)
    length, nbytes = branched.get_seq_length(), branched.nbytes()
    endings = torch.randint(0, 256, (4, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), branched.branch(4) as cache:
        scored = model(endings, **with_cache(model, cache)).logits
        assert scored.shape == (4, 7, 256) and cache.get_seq_length() == length + 7
        with pytest.raises(RuntimeError, match="inside branch"):
            cache.commit(4)
    # Each row of the batched forward equals running that ending alone on the prefix.
    with torch.no_grad():
        alone = model(endings[2:3], **with_cache(model, _prefixed_cache(model, ids))).logits
    assert torch.allclose(scored[2:3], alone, atol=1e-5)
    assert branched.get_seq_length() == length and branched.nbytes() == nbytes
    nxt = ids[:, 138:139]
    with torch.no_grad():
        after = model(nxt, **with_cache(model, branched)).logits
        expected = model(nxt, **with_cache(model, untouched)).logits
    assert torch.equal(after, expected)


def test_crop_takes_back_pending_tokens_only(tiny):
    model, ids = tiny
    cache = _prefixed_cache(model, ids)  # 128 committed + 10 pending
    cache.crop(135)  # keep 135 tokens: drop 3 pending
    assert cache.get_seq_length() == 135 and cache.pending_length == 7
    reference = MixedPrecisionKVCache(config=model.config)
    _run_blocks(model, reference, ids, (64, 64, 7), (4, 2, None))
    nxt = ids[:, 135:136]
    with torch.no_grad():
        # (equal up to float noise: the pending K/V came from a 10- vs a 7-token forward)
        got, want = model(nxt, **with_cache(model, cache)).logits, model(nxt, **with_cache(model, reference)).logits
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="pending"):
        cache.crop(100)  # would cut into committed (quantized) tokens


def test_pending_error_is_the_hand_computed_round_trip_error(tiny):
    model, ids = tiny
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP)
    _run_blocks(model, cache, ids, [64, 64], [4, None])  # block 1 pending, block 0 committed
    committed_before = cache.block_bits[:]
    got = cache.pending_error(2)
    per_layer = []
    for layer in cache.layers:
        err = norm = 0
        for x, axis in ((layer.keys, -2), (layer.values, -1)):
            err = err + (x - dequantize(quantize(x, 2, axis=axis, group_size=GROUP))).square().sum(dim=(0, 1, 3))
            norm = norm + x.square().sum(dim=(0, 1, 3))
        per_layer.append(err / norm.mean())
    torch.testing.assert_close(got, torch.stack(per_layer).mean(0), rtol=1e-5, atol=1e-7)
    assert got.shape == (64,) and bool((got > 0).all())
    assert cache.pending_error(8).mean() < got.mean() / 100  # 6 more bits: ~4^6 less squared error
    assert cache.pending_length == 64 and cache.block_bits == committed_before  # nothing committed
    cache.commit(2)
    with pytest.raises(ValueError, match="nothing pending"):
        cache.pending_error(2)


def test_errors(tiny):
    model, ids = tiny
    cache = MixedPrecisionKVCache(config=model.config)
    with pytest.raises(ValueError, match="nothing pending"):
        cache.commit(4)
    _run_blocks(model, cache, ids, (10,), (None,))
    with pytest.raises(ValueError, match="unsupported bit-width"):
        cache.commit(5)
    cache.commit(4)
    with pytest.raises(ValueError, match="do not match"):
        cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), layer_idx=0)
    with pytest.raises(ValueError, match="batch size 1"):
        batched = MixedPrecisionKVCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :8].expand(2, -1), **with_cache(model, batched))
        with batched.branch(3):
            pass
    with pytest.raises(ValueError, match="group_size"):
        MixedPrecisionKVCache(config=model.config, group_size=0)
    with pytest.raises(ValueError, match="interval"):
        MixedPrecisionKVCache(config=model.config, interval=0)


@pytest.mark.integration
def test_embedded_model_prefix(embedded_model):
    model, _ = embedded_model
    ids = torch.randint(100, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    blocks = (64, 64, 64, 8)
    ours = _run_blocks(model, MixedPrecisionKVCache(config=model.config), ids, blocks, (16, 16, 16, 16))
    with torch.no_grad():
        full = model(ids).logits[:, -8:]
    assert (ours - full).abs().max() < 0.05 * full.abs().max()  # fp16 K/V storage only
    assert torch.equal(ours.argmax(-1), full.argmax(-1))

    four = MixedPrecisionKVCache(config=model.config)
    logits = _run_blocks(model, four, ids, (64, 64, 64, 8), (4, 4, 4, None))
    assert torch.isfinite(logits).all()
    assert four.nbytes(include_pending=False) <= 0.29 * four.fp16_nbytes(include_pending=False)
