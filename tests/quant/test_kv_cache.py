"""MixedPrecisionKVCache against hand-built references on a tiny random Llama (and once on SmolLM2)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from _tiny_llama import tiny_llama
from transformers import DynamicCache

from envs.cache_kwarg import with_cache
from quant.kv_cache import CommittedBlock, MixedPrecisionKVCache
from quant.uniform import dequantize, quantize

GROUP = 64


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(1))
    return model, ids


def _pair(b):
    return (b, b) if isinstance(b, int) else tuple(b)


def _sinks_in(start, size, sink):
    """How many of the block [start, start + size) are among the first ``sink`` tokens."""
    return max(0, min(sink - start, size))


def _run_blocks(model, cache, ids, blocks, bits):
    """Feed ``ids`` block by block, committing block i at ``bits[i]`` (None: leave it pending).

    ``bits[i]`` is an int or a (key_bits, value_bits) pair, committed as given (``commit(bits)``).
    """
    start, logits = 0, None
    with torch.no_grad():
        for size, b in zip(blocks, bits, strict=True):
            logits = model(ids[:, start : start + size], **with_cache(model, cache)).logits
            if b is not None:
                cache.commit(b)
            start += size
    return logits


def _reference_blocks(model, ids, blocks, bits, sink=0):
    """The same computation by hand: a DynamicCache whose just-run block is replaced by its
    quantize/dequantize round trip (keys per channel over tokens at the key bits, values per token
    at the value bits); tokens among the first ``sink`` are only rounded to fp16 instead, and the
    rest of their block is quantized without them."""
    cache, start, logits = DynamicCache(), 0, None
    with torch.no_grad():
        for size, b in zip(blocks, bits, strict=True):
            logits = model(ids[:, start : start + size], **with_cache(model, cache)).logits
            if b is not None:
                sinks = _sinks_in(start, size, sink)
                for layer in cache.layers:
                    for name, axis, width in (("keys", -2, _pair(b)[0]), ("values", -1, _pair(b)[1])):
                        protected = getattr(layer, name)[..., start : start + sinks, :]
                        protected.copy_(protected.half())
                        if sinks < size:
                            block = getattr(layer, name)[..., start + sinks : start + size, :]
                            block.copy_(dequantize(quantize(block, width, axis=axis, group_size=GROUP)))
            start += size
    return logits


def _hand_average_bits(blocks, bits, sink=0):
    """Token-weighted (key_bits + value_bits) / 2, sink tokens at 16 (keys and values equal in size)."""
    total = tokens = start = 0
    for n, b in zip(blocks, bits, strict=True):
        if b is not None:
            sinks = _sinks_in(start, n, sink)
            total += 16 * sinks + (n - sinks) * sum(_pair(b)) / 2
            tokens += n
        start += n
    return total / tokens


@pytest.mark.parametrize(("sink", "bits"), [(0, (16, 16, 16, None)), (70, ((16, 16), [16, 16], 16, None))])
def test_all_16_bit_blocks_match_dynamic_cache(tiny, sink, bits):
    model, ids = tiny
    blocks = (64, 64, 64, 20)
    ours = _run_blocks(model, MixedPrecisionKVCache(config=model.config, sink_tokens=sink), ids, blocks, bits)
    with torch.no_grad():
        full = model(ids[:, : sum(blocks)]).logits[:, -blocks[-1] :]
    assert torch.allclose(ours, full, atol=1e-3, rtol=0)  # fp16 storage of K/V is the only difference


@pytest.mark.parametrize(
    ("blocks", "bits", "sink"),
    [
        ((64, 64, 64, 64, 64, 30), (4, 2, 8, 16, 3, None), 0),  # every width, then a pending block
        ((64, 64, 30, 64, 17), (4, 4, 2, 2, None), 0),  # merged same-bits segments, a partial group
        ((40, 64, 64), (8, 8, None), 0),  # a partial key group that must not be merged into
        ((64, 64, 64, 64, 30), ((4, 2), (2, 4), (8, 3), (16, 2), None), 0),  # separate key/value bits
        ((64, 64, 64, 64, 17), ((4, 2), (4, 2), (4, 4), (2, 16), None), 0),  # pairs merge only if equal
        ((64, 64, 64, 10), (2, (4, 2), 2, None), 5),  # sinks inside the first block
        ((16, 16, 16, 64, 64, 10), (2, (4, 2), (3, 2), 2, 2, None), 20),  # sinks spanning two blocks
    ],
)
def test_mixed_blocks_match_a_hand_computed_reference(tiny, blocks, bits, sink):
    model, ids = tiny
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=sink)
    ours = _run_blocks(model, cache, ids, blocks, bits)
    reference = _reference_blocks(model, ids, blocks, bits, sink)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)
    # ... and the quantization really changed the logits (otherwise the comparison proves nothing).
    with torch.no_grad():
        full = model(ids[:, : sum(blocks)]).logits[:, -blocks[-1] :]
    assert (ours - full).abs().max() > 1e-4  # 10x the tolerance above, even with 8-bit blocks only
    committed = [(_pair(b), n) for n, b in zip(blocks, bits, strict=True) if b is not None]
    assert cache.block_key_value_bits == [p for p, _ in committed]
    # block_bits: (the int width, tokens) for uniform blocks, (mean of key and value bits, tokens) for pairs
    assert cache.block_bits == [((k + v) / 2, n) for (k, v), n in committed]
    assert all(
        isinstance(b, int) for (b, _), ((k, v), _) in zip(cache.block_bits, committed, strict=True) if k == v
    )
    assert sum(block.sink_tokens for block in cache.blocks) == min(sink, cache.committed_length)
    assert cache.committed_length == sum(n for _, n in committed)
    assert cache.pending_length == (blocks[-1] if bits[-1] is None else 0)
    assert cache.get_seq_length() == sum(blocks)
    assert cache.average_bits() == pytest.approx(_hand_average_bits(blocks, bits, sink))


def test_segments_merge_only_when_key_and_value_bits_both_match(tiny):
    model, ids = tiny
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP)
    _run_blocks(model, cache, ids, (64, 64, 64, 64, 64), ((4, 2), (4, 2), (4, 4), (2, 4), (2, 4)))
    for layer in cache.layers:
        assert [(s.key_bits, s.value_bits, s.length) for s in layer.segments] == [
            (4, 2, 128),
            (4, 4, 64),
            (2, 4, 128),
        ]


def test_segments_merge_when_read_and_bytes_do_not_wait_for_it(tiny):
    """Merging is deferred to the first read of ``segments`` (a kept-floats cache may never read them): the
    bytes counted before that read equal the bytes after it, and the merged segments are the eager ones."""
    model, ids = tiny
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP, keep_dequantized=True)
    _run_blocks(model, cache, ids, (64, 64, 30, 64), (4, 4, 4, 2))
    before = cache.nbytes(), [layer.fp16_nbytes() for layer in cache.layers]
    assert all(len(layer._unmerged) == 4 for layer in cache.layers)  # nothing merged at commit time
    assert [(s.key_bits, s.length) for s in cache.layers[0].segments] == [(4, 158), (2, 64)]
    assert (cache.nbytes(), [layer.fp16_nbytes() for layer in cache.layers]) == before
    assert not cache.layers[0]._unmerged


def test_reading_alternating_bits_gathers_each_width_once_and_a_commit_starts_over(tiny):
    """After a read every layer's segments of one width are views of one joined tensor (the per-step
    read unpacks each width once), the bytes held are unchanged, and the next commit is read too."""
    model, ids = tiny
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP)
    blocks, bits = (64, 64, 64, 64, 30), (2, 4, 2, 4, None)
    _run_blocks(model, cache, ids, blocks[:4], bits[:4])
    before = cache.nbytes()
    _run_blocks(model, cache, ids[:, 256:], blocks[4:], bits[4:])  # a forward reads the committed tokens
    assert cache.nbytes() == before + sum(2 * layer.keys.numel() * 4 for layer in cache.layers)  # + fp32 pending
    for layer in cache.layers:
        for name in ("keys", "values"):
            storages = [getattr(s, name).data.untyped_storage().data_ptr() for s in layer.segments]
            assert storages[0] == storages[2] and storages[1] == storages[3] and storages[0] != storages[1]
    cache.commit(8)
    assert all(not layer._gathered for layer in cache.layers)
    logits = _run_blocks(model, cache, ids[:, 286:], (20,), (None,))
    reference = _reference_blocks(model, ids[:, :306], (*blocks, 20), (*bits[:4], 8, None))
    assert torch.allclose(logits, reference, atol=1e-5, rtol=1e-5)


def _row_bytes(bits: int, head_dim: int) -> int:
    """Bytes of one row of ``head_dim`` packed codes; 3-bit: a 2-bit plane and a 1-bit plane."""
    return math.ceil(head_dim / 4) + math.ceil(head_dim / 8) if bits == 3 else math.ceil(head_dim * bits / 8)


def _hand_pair_nbytes(blocks, bits, sink=0, heads=2, head_dim=16, layers=2):
    """Storage by hand, block by block: sink tokens as fp16 K and V; the rest of a block as packed
    key codes + fp16 scale and zero per (channel, group of tokens) at the key bits, and packed value
    codes + fp16 scale and zero per (token, group of channels) at the value bits; fp32 pending.
    (Merging blocks into segments saves nothing: blocks only merge after a whole key group.)"""

    def one(b, n, axis_groups):
        if b == 16:
            return 2 * heads * n * head_dim
        codes = heads * n * _row_bytes(b, head_dim)
        return codes + 4 * axis_groups

    per_layer = start = 0
    for n, b in zip(blocks, bits, strict=True):
        if b is None:
            per_layer += 2 * heads * n * head_dim * 4
            continue
        sinks = _sinks_in(start, n, sink)
        per_layer += 2 * 2 * heads * sinks * head_dim
        rest, (k, v) = n - sinks, _pair(b)
        if rest:
            per_layer += one(k, rest, heads * math.ceil(rest / GROUP) * head_dim)
            per_layer += one(v, rest, heads * rest * math.ceil(head_dim / GROUP))
        start += n
    return layers * per_layer


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
        codes = heads * n * _row_bytes(b, head_dim)
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


@pytest.mark.parametrize(("key_bits", "value_bits"), list(itertools.product((2, 3, 4, 8, 16), repeat=2)))
def test_nbytes_is_the_formula_for_every_key_value_pair(tiny, key_bits, value_bits):
    model, ids = tiny
    blocks, bits = (64, 30, 64, 17), ((key_bits, value_bits), (key_bits, value_bits), (8, 2), None)
    for sink in (0, 5):
        cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=sink)
        _run_blocks(model, cache, ids, blocks, bits)
        assert cache.nbytes() == _hand_pair_nbytes(blocks, bits, sink)
        assert cache.nbytes(include_pending=False) == _hand_pair_nbytes(blocks[:-1], bits[:-1], sink)
        assert cache.fp16_nbytes() == 2 * 2 * 2 * 16 * 2 * sum(blocks)


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


def test_generate_with_a_hook_returning_key_value_pairs(tiny):
    model, ids = tiny
    prompt = ids[:, :20]
    choices = iter([(4, 2), 8, np.array([2, 4]), [16, 8], np.int64(4)])
    cache = MixedPrecisionKVCache(
        config=model.config, policy=lambda c: next(choices), interval=8, sink_tokens=4
    )
    with torch.no_grad():
        out = model.generate(prompt, **with_cache(model, cache), max_new_tokens=40, do_sample=False)
    assert out.shape == (1, 60)
    assert cache.block_key_value_bits == [(4, 2), (8, 8), (2, 4), (16, 8), (4, 4)]
    assert cache.block_bits == [(3, 20), (8, 8), (3, 8), (12, 8), (4, 8)]
    assert cache.blocks[0] == CommittedBlock(4, 2, 20, 4) and cache.blocks[1].sink_tokens == 0
    assert cache.average_bits() == pytest.approx((4 * 16 + 16 * 3 + 8 * 8 + 8 * 3 + 8 * 12 + 8 * 4) / 52)


class _Recorder:
    """Wraps a layer's ``update``: the states the model hands in, and what attention gets back."""

    def __init__(self, layer):
        self.update, self.given, self.seen = layer.update, [], None
        layer.update = self

    def __call__(self, key_states, value_states, *args, **kwargs):
        self.given.append((key_states.clone(), value_states.clone()))
        self.seen = self.update(key_states, value_states, *args, **kwargs)
        return self.seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sink_tokens_are_what_the_model_produced_in_fp16(tiny, dtype):
    """Attention sees, for every sink position, the model's own key/value states rounded to fp16:
    in an fp16 model exactly those states; other positions of the same 2-bit blocks are quantized."""
    model, ids = tiny
    model = tiny_llama().to(dtype)
    sink = 20
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=sink)
    recorders = [_Recorder(layer) for layer in cache.layers]
    _run_blocks(model, cache, ids, (16, 16, 64, 1), (2, 2, 2, None))
    for rec in recorders:
        produced_keys = torch.cat([k for k, _ in rec.given], dim=-2)
        produced_values = torch.cat([v for _, v in rec.given], dim=-2)
        seen_keys, seen_values = rec.seen
        assert seen_keys.shape == produced_keys.shape and seen_keys.dtype == dtype
        for seen, produced in ((seen_keys, produced_keys), (seen_values, produced_values)):
            assert torch.equal(seen[..., :sink, :], produced[..., :sink, :].half().to(dtype))
            if dtype == torch.float16:
                assert torch.equal(seen[..., :sink, :], produced[..., :sink, :])
            assert not torch.equal(seen[..., sink:96, :], produced[..., sink:96, :].half().to(dtype))
    for layer in cache.layers:  # the sinks are a segment of their own, not in any block's groups
        first = layer.segments[0]
        assert (first.key_bits, first.value_bits, first.length) == (16, 16, sink)
    assert [b.sink_tokens for b in cache.blocks] == [16, 4, 0]
    assert cache.average_bits() == pytest.approx((16 * 20 + 2 * 76) / 96)


def test_pending_error_with_key_value_pairs_and_sinks(tiny):
    model, ids = tiny
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=10)
    _run_blocks(model, cache, ids, [64], [None])
    got = cache.pending_error((4, 2))
    per_layer = []
    for layer in cache.layers:
        err, norm = torch.zeros(64), 0
        for x, axis, b in ((layer.keys, -2, 4), (layer.values, -1, 2)):
            rest = x[..., 10:, :]
            err[10:] += (
                (rest - dequantize(quantize(rest, b, axis=axis, group_size=GROUP)))
                .square()
                .sum(dim=(0, 1, 3))
            )
            norm = norm + x.square().sum(dim=(0, 1, 3))
        per_layer.append(err / norm.mean())
    torch.testing.assert_close(got, torch.stack(per_layer).mean(0), rtol=1e-5, atol=1e-7)
    assert bool((got[:10] == 0).all()) and bool((got[10:] > 0).all())
    assert cache.pending_error(2)[10:].mean() > got[10:].mean()  # 2-bit keys hurt more than 4-bit ones


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
            err = err + (x - dequantize(quantize(x, 2, axis=axis, group_size=GROUP))).square().sum(
                dim=(0, 1, 3)
            )
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


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (((4, 5),), {}, r"value bits of \(4, 5\): unsupported bit-width 5"),
        (([1, 4],), {}, r"key bits of \[1, 4\]: unsupported bit-width 1"),
        (((4, 2, 2),), {}, "exactly 2 entries"),
        (("4",), {}, "an int or a"),
        ((), {}, "needs bits"),
        ((), {"key_bits": 4}, "both key_bits and value_bits"),
        ((4,), {"value_bits": 2}, "not both"),
        ((), {"key_bits": 4, "value_bits": 6}, "unsupported bit-width 6"),
    ],
)
def test_bad_bits_are_clear_errors(tiny, args, kwargs, match):
    model, ids = tiny
    cache = MixedPrecisionKVCache(config=model.config)
    _run_blocks(model, cache, ids, (10,), (None,))
    with pytest.raises(ValueError, match=match):
        cache.commit(*args, **kwargs)
    assert cache.pending_length == 10 and not cache.blocks  # nothing committed


@pytest.mark.parametrize("sink", [-1, 2.5, True])
def test_bad_sink_tokens_are_clear_errors(tiny, sink):
    model, _ = tiny
    with pytest.raises(ValueError, match="sink_tokens must be an integer >= 0"):
        MixedPrecisionKVCache(config=model.config, sink_tokens=sink)


def test_a_hook_returning_a_bad_pair_fails_clearly(tiny):
    model, ids = tiny
    cache = MixedPrecisionKVCache(config=model.config, policy=lambda c: (4, 7), interval=8)
    with torch.no_grad(), pytest.raises(ValueError, match="value bits of .*unsupported bit-width 7"):
        model.generate(ids[:, :20], **with_cache(model, cache), max_new_tokens=4, do_sample=False)


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


# --- one setting per layer group ---------------------------------------------------------------------
def test_commit_groups_gives_each_group_its_setting(tiny):
    from quant.kv_cache import layer_groups

    model, ids = tiny
    grouped = MixedPrecisionKVCache(config=model.config, group_size=GROUP)
    per_layer = [MixedPrecisionKVCache(config=model.config, group_size=GROUP) for _ in range(2)]
    with torch.no_grad():
        model(ids[:, :128], **with_cache(model, grouped))
        for cache in per_layer:
            model(ids[:, :128], **with_cache(model, cache))
    grouped.commit_groups([(4, 2), 8])
    per_layer[0].commit((4, 2))
    per_layer[1].commit(8)
    # layer g of the grouped cache holds exactly what a cache committed at group g's setting holds
    for g, cache in enumerate(per_layer):
        mine, theirs = grouped.layers[g].segments, cache.layers[g].segments
        assert [(s.key_bits, s.value_bits) for s in mine] == [(s.key_bits, s.value_bits) for s in theirs]
        assert torch.equal(dequantize(mine[0].keys, torch.float32), dequantize(theirs[0].keys, torch.float32))
        assert grouped.layers[g].nbytes() == cache.layers[g].nbytes()
    assert grouped.blocks == [CommittedBlock(6, 5, 128, 0, ((4, 2), (8, 8)))]
    assert grouped.average_bits() == (3 + 8) / 2 and grouped.block_bits == [(5.5, 128)]
    assert layer_groups(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]


def test_commit_groups_with_one_setting_is_commit(tiny):
    model, ids = tiny
    caches = [MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=3) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :100], **with_cache(model, cache))
    caches[0].commit((4, 2))
    caches[1].commit_groups([(4, 2)])
    assert caches[0].blocks == caches[1].blocks and caches[0].nbytes() == caches[1].nbytes()


@pytest.mark.parametrize("settings, fix", [([4, 4, 4], "larger than the model's 2 layers"), ([], "non-empty"),
                                           ([4, (4, 5)], "unsupported bit-width")])
def test_commit_groups_bad_input(tiny, settings, fix):
    model, ids = tiny
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP)
    with torch.no_grad():
        model(ids[:, :16], **with_cache(model, cache))
    with pytest.raises(ValueError, match=fix):
        cache.commit_groups(settings)
