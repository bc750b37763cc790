"""Rotated keys and values: ``MixedPrecisionKVCache(rotate_keys=True, rotate_values=...)`` against the same blocks
rotated, round-tripped and rotated back by hand (``deq(q(k @ R)) @ R.T``; sinks and 16-bit runs as they are),
plus what must not change (the unrotated half, bytes, bookkeeping). Whether it helps is an experiment, not a unit property (quant.rotation)."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_llama import tiny_llama

from envs.cache_kwarg import with_cache
from quant.kv_cache import KEY_AXIS, VALUE_AXIS, MixedPrecisionKVCache, block_runs
from quant.rotation import rotation_matrix
from quant.uniform import dequantize, quantize

GROUP = 16
LAYERS, HEADS, DIM = 2, 2, 16


def _states(tokens: int, seed: int, outlier: float = 8.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: random [1, heads, tokens, dim] keys and values; key channel 3 scaled by ``outlier``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(LAYERS):
        k = torch.randn(1, HEADS, tokens, DIM, generator=g)
        v = torch.randn(1, HEADS, tokens, DIM, generator=g)
        k[..., 3] *= outlier
        out.append((k, v))
    return out


def _cache(rotate: bool, sink_tokens: int = 0, keep: bool = False, values: bool = False) -> MixedPrecisionKVCache:
    return MixedPrecisionKVCache(
        LAYERS, group_size=GROUP, sink_tokens=sink_tokens, keep_dequantized=keep, rotate_keys=rotate, rotate_values=values
    )


def _feed(cache: MixedPrecisionKVCache, states) -> None:
    for i, (k, v) in enumerate(states):
        cache.update(k, v, i)


def _seen(cache: MixedPrecisionKVCache, probe) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What attention gets from each layer once one more token arrives (committed tokens dequantized)."""
    return [tuple(t.clone() for t in cache.update(k, v, i)) for i, (k, v) in enumerate(probe)]


def _round_trip(x: torch.Tensor, bits: int, axis: int, rotate: bool) -> torch.Tensor:
    if bits == 16:
        return x.half().float()
    if rotate:
        r = rotation_matrix(DIM)
        return dequantize(quantize(x @ r, bits, axis, GROUP)) @ r.T
    return dequantize(quantize(x, bits, axis, GROUP))


def _by_hand(states, runs, rotate: bool, values: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each run round-tripped on its own; keys (values) below 16 bits in the rotated basis when ``rotate`` (``values``)."""
    out = []
    for k, v in states:
        hk, hv = torch.empty_like(k), torch.empty_like(v)
        for start, length, kb, vb in runs:
            part = slice(start, start + length)
            hk[..., part, :] = _round_trip(k[..., part, :], kb, KEY_AXIS, rotate)
            hv[..., part, :] = _round_trip(v[..., part, :], vb, VALUE_AXIS, values)
        out.append((hk, hv))
    return out


@pytest.mark.parametrize("dim", [1, 2, 16, 64, 128, 80, 48])
def test_rotation_is_orthonormal_and_fixed(dim):
    r = rotation_matrix(dim)
    assert r.shape == (dim, dim) and r.dtype == torch.float32
    torch.testing.assert_close(r @ r.T, torch.eye(dim), atol=1e-5, rtol=0)
    assert torch.equal(r, rotation_matrix(dim))  # the same matrix every call (and every machine: no global RNG)
    if dim & (dim - 1) == 0:  # Hadamard: every entry +-1/sqrt(n), so every channel is spread over all
        torch.testing.assert_close(r.abs(), torch.full((dim, dim), dim**-0.5))


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "64"])
def test_rotation_refuses_bad_head_dim(bad):
    with pytest.raises(ValueError, match="head_dim"):
        rotation_matrix(bad)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("keys,values", [(True, False), (False, True), (True, True)], ids=["k", "v", "kv"])
def test_rotated_block_equals_rotation_by_hand(keep, sinks, keys, values):
    states, probe = _states(32, 0), _states(1, 1)
    cache = _cache(keys, sinks, keep, values)
    _feed(cache, states)
    protect = [t in (9, 10, 20) for t in range(32)]
    cache.commit((2, 3), protect=protect, protect_bits=16)
    runs = block_runs(32, 2, 3, sinks, protect, (16, 16))
    for (k, v), (hk, hv) in zip(_seen(cache, probe), _by_hand(states, runs, keys, values), strict=True):
        for seen, hand, rotated in ((k, hk, keys), (v, hv, values)):
            if rotated:
                torch.testing.assert_close(seen[..., :32, :], hand, atol=1e-5, rtol=1e-5)
            else:  # the half not rotated is bit for bit what the plain cache stores
                assert torch.equal(seen[..., :32, :], hand)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("keys,values", [(True, False), (False, True)], ids=["k", "v"])
def test_rotation_changes_its_half_only_and_no_bytes(keep, keys, values):
    states, probe = _states(48, 2), _states(1, 3)
    plain, rotated = _cache(False, 2, keep), _cache(keys, 2, keep, values)
    for cache in (plain, rotated):
        _feed(cache, states)
        cache.commit(2, protect=[t == 30 for t in range(48)], protect_bits=4)
    for seen_plain, seen_rot in zip(_seen(plain, probe), _seen(rotated, probe), strict=True):
        for half, rotated_half in ((0, keys), (1, values)):
            p, r = seen_plain[half], seen_rot[half]
            assert torch.equal(p[..., :2, :], r[..., :2, :])  # fp16 sinks stored as they are
            if rotated_half:
                assert not torch.allclose(p[..., 2:48, :], r[..., 2:48, :])  # the quantized ones did change
            else:
                assert torch.equal(p, r)
    assert rotated.nbytes() == plain.nbytes() and rotated.average_bits() == plain.average_bits()
    assert rotated.blocks == plain.blocks


def test_segments_merge_only_alike_and_read_back_exactly():
    """Blocks at equal bits merge into one rotated segment; a 16-bit block in between is stored unrotated; the
    whole cache reads back as block-by-block rotation by hand."""
    cache = _cache(True, keep=False)
    blocks = [_states(16, s) for s in (10, 11, 12, 13)]
    bits = [2, 2, 16, 2]
    for states, b in zip(blocks, bits, strict=True):
        _feed(cache, states)
        cache.commit(b)
    layer = cache.layers[0]
    assert [(s.key_bits, s.key_rotation is not None, s.length) for s in layer.segments] == [
        (2, True, 32), (16, False, 16), (2, True, 16)
    ]
    seen = _seen(cache, _states(1, 14))
    for i in range(LAYERS):
        start = 0
        for states, b in zip(blocks, bits, strict=True):
            hk, _ = _by_hand([states[i]], block_runs(16, b, b), rotate=True)[0]
            torch.testing.assert_close(seen[i][0][..., start : start + 16, :], hk, atol=1e-5, rtol=1e-5)
            start += 16


def test_stacked_and_per_layer_commits_agree():
    """The one-quantization-for-all-layers commit and the per-layer commit store the same rotated keys."""
    states, probe = _states(32, 6), _states(1, 7)
    stacked = _cache(True)
    _feed(stacked, states)
    stacked.commit(3)
    by_layer = _cache(True)
    _feed(by_layer, states)
    for layer in by_layer.layers:
        layer.commit(3)
    for (ks, vs), (kl, vl) in zip(_seen(stacked, probe), _seen(by_layer, probe), strict=True):
        assert torch.equal(ks, kl) and torch.equal(vs, vl)


@pytest.mark.parametrize("keys,values", [(True, False), (False, True), (True, True)], ids=["k", "v", "kv"])
def test_pending_error_is_the_committed_error(keys, values):
    """pending_error quantizes as the rotated commit does: it predicts the error the commit then makes."""
    states, probe = _states(32, 8, outlier=20.0), _states(1, 9)
    cache = _cache(keys, values=values)
    _feed(cache, states)
    predicted = cache.pending_error(2)
    cache.commit(2)
    seen = _seen(cache, probe)
    measured = torch.zeros(32)
    for (k, v), (sk, sv) in zip(seen, states, strict=True):
        err = (k[..., :32, :] - sk).square().sum(dim=(0, 1, 3)) + (v[..., :32, :] - sv).square().sum(dim=(0, 1, 3))
        norm = sk.square().sum(dim=(0, 1, 3)) + sv.square().sum(dim=(0, 1, 3))
        measured += err / norm.mean()
    torch.testing.assert_close(predicted, measured / LAYERS, atol=1e-4, rtol=1e-3)
    plain = _cache(False)
    _feed(plain, states)
    assert not torch.allclose(predicted, plain.pending_error(2))  # it did quantize in the rotated basis


def test_deepcopy_keeps_reading_the_same_keys():
    states, probe = _states(32, 15), _states(1, 16)
    cache = _cache(True, keep=True)
    _feed(cache, states)
    cache.commit(2)
    twin = copy.deepcopy(cache)
    for (k, v), (tk, tv) in zip(_seen(cache, probe), _seen(twin, probe), strict=True):
        assert torch.equal(k, tk) and torch.equal(v, tv)


def test_model_runs_on_a_rotated_cache_and_all_16_is_untouched():
    """A real model's forward through the cache: at 16 bits rotation plays no part (exactly the plain cache's
    logits); at 2 bits the logits differ from the plain cache's (the keys really are stored rotated)."""
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    logits = {}
    for rotate in (False, True):
        for bits in (16, 2):
            cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP, rotate_keys=rotate)
            with torch.inference_mode():
                model(input_ids=ids[:, :32], **with_cache(model, cache), use_cache=True)
                cache.commit(bits)
                logits[rotate, bits] = model(input_ids=ids[:, 32:], **with_cache(model, cache), use_cache=True).logits
    assert torch.equal(logits[True, 16], logits[False, 16])
    assert not torch.allclose(logits[True, 2], logits[False, 2])
