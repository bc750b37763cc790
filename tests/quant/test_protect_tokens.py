"""Per-token precision: ``MixedPrecisionKVCache.commit(bits, protect=..., protect_bits=...)`` against the
same block stored run by run by hand (sinks in fp16, each protected run and each plain run quantized on
its own), plus the block's bookkeeping (``protected_tokens``, ``average_bits``, ``nbytes``)."""

from __future__ import annotations

import pytest
import torch
from _tiny_llama import tiny_llama

from envs.cache_kwarg import with_cache
from quant.kv_cache import KEY_AXIS, VALUE_AXIS, CommittedBlock, MixedPrecisionKVCache, block_runs
from quant.uniform import dequantize, quantize

GROUP = 16
LAYERS, HEADS, DIM = 2, 2, 16


def _states(tokens: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: random [1, heads, tokens, dim] keys and values, with a few outlier channels/tokens so a
    block's min-max ranges are wide (a protected token must not stretch its neighbours' ranges)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(LAYERS):
        k = torch.randn(1, HEADS, tokens, DIM, generator=g)
        v = torch.randn(1, HEADS, tokens, DIM, generator=g)
        k[..., 3] *= 8.0
        v[..., tokens // 2, :] *= 6.0
        out.append((k, v))
    return out


def _cache(sink_tokens: int = 0, keep: bool = False) -> MixedPrecisionKVCache:
    return MixedPrecisionKVCache(LAYERS, group_size=GROUP, sink_tokens=sink_tokens, keep_dequantized=keep)


def _feed(cache: MixedPrecisionKVCache, states) -> None:
    for i, (k, v) in enumerate(states):
        cache.update(k, v, i)


def _seen(cache: MixedPrecisionKVCache, probe) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What attention gets from each layer once one more token arrives (committed tokens dequantized)."""
    return [tuple(t.clone() for t in cache.update(k, v, i)) for i, (k, v) in enumerate(probe)]


def _round_trip(x: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    if bits == 16:
        return x.half().float()
    return dequantize(quantize(x, bits, axis=axis, group_size=GROUP))


def _by_hand(states, runs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each run ``(start, length, key_bits, value_bits)`` of a block round-tripped on its own."""
    out = []
    for k, v in states:
        hk, hv = torch.empty_like(k), torch.empty_like(v)
        for start, length, kb, vb in runs:
            hk[..., start : start + length, :] = _round_trip(k[..., start : start + length, :], kb, KEY_AXIS)
            hv[..., start : start + length, :] = _round_trip(v[..., start : start + length, :], vb, VALUE_AXIS)
        out.append((hk, hv))
    return out


def _commit_and_read(states, bits, sink=0, keep=False, **commit_kwargs):
    cache = _cache(sink, keep)
    _feed(cache, states)
    cache.commit(bits, **commit_kwargs)
    n = states[0][0].shape[-2]
    seen = _seen(cache, _states(1, seed=99))
    return cache, [(k[..., :n, :], v[..., :n, :]) for k, v in seen]


def _assert_equal(got, want):
    for (gk, gv), (wk, wv) in zip(got, want, strict=True):
        assert torch.equal(gk, wk)
        assert torch.equal(gv, wv)


# ------------------------------------------------------------------------------------------ block_runs
def test_block_runs_sinks_first_marks_at_protect_bits_equal_neighbours_merged():
    mask = [False, True, True, False, False, True, True, True, False]
    # tokens 0-1 are sinks (token 1's mark changes nothing); token 2's fp16 mark joins them
    assert block_runs(9, 2, 2, 2, mask, (16, 16)) == [(0, 3, 16, 16), (3, 2, 2, 2), (5, 3, 16, 16), (8, 1, 2, 2)]
    assert block_runs(9, 4, 2, 0, mask, (8, 8)) == [
        (0, 1, 4, 2), (1, 2, 8, 8), (3, 2, 4, 2), (5, 3, 8, 8), (8, 1, 4, 2)]
    assert block_runs(9, 2, 2, 3) == [(0, 3, 16, 16), (3, 6, 2, 2)]
    # protecting at the block's own setting is no split at all
    assert block_runs(9, 4, 4, 0, mask, (4, 4)) == [(0, 9, 4, 4)]


# ------------------------------------------------------------------------------------- against hand runs
@pytest.mark.parametrize("sink", [0, 4])
@pytest.mark.parametrize("keep", [False, True])
def test_protecting_nothing_is_bit_identical_to_a_plain_commit(sink, keep):
    states = _states(48, seed=1)
    plain_cache, plain = _commit_and_read(states, 2, sink, keep)
    for protect in ([False] * 48, torch.zeros(48, dtype=torch.bool), None):
        cache, got = _commit_and_read(states, 2, sink, keep, protect=protect)
        _assert_equal(got, plain)
        assert cache.blocks == plain_cache.blocks and cache.blocks[-1].protected_tokens == 0
        assert cache.nbytes() == plain_cache.nbytes()
    # ... and a plain commit really is the hand-quantized block (so the comparison above is not vacuous)
    _assert_equal(plain, _by_hand(states, [(0, sink, 16, 16)] * bool(sink) + [(sink, 48 - sink, 2, 2)]))


@pytest.mark.parametrize("keep", [False, True])
def test_protecting_every_non_sink_token_at_16_gives_the_fp16_states(keep):
    states = _states(48, seed=2)
    cache, got = _commit_and_read(states, 2, sink=4, keep=keep, protect=[True] * 48)
    for (gk, gv), (k, v) in zip(got, states, strict=True):
        assert torch.equal(gk, k.half().float()) and torch.equal(gv, v.half().float())
    block = cache.blocks[-1]
    assert block == CommittedBlock(2, 2, 48, 4, (), 44, (16, 16))  # the 4 sinks are not counted as protected
    assert cache.average_bits() == 16
    assert cache.nbytes(False) == cache.fp16_nbytes(False)  # everything stored as fp16
    _, plain = _commit_and_read(states, 2, sink=4, keep=keep)
    assert not torch.equal(plain[0][0], got[0][0])  # 2 bits really loses something


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize(("bits", "protect_bits"), [(2, 16), ((4, 2), 8), (2, (8, 4))])
def test_one_protected_token_is_a_run_of_its_own(keep, bits, protect_bits):
    states = _states(48, seed=3)
    t = 24  # the token whose values are the outliers (_states): also the one whose range matters most
    mask = [i == t for i in range(48)]
    cache, got = _commit_and_read(states, bits, keep=keep, protect=mask, protect_bits=protect_bits)
    kb, vb = (bits, bits) if isinstance(bits, int) else bits
    pk, pv = (protect_bits, protect_bits) if isinstance(protect_bits, int) else protect_bits
    want = _by_hand(states, [(0, t, kb, vb), (t, 1, pk, pv), (t + 1, 48 - t - 1, kb, vb)])
    _assert_equal(got, want)
    if protect_bits == 16:  # the protected token exactly (as fp16), its neighbours quantized
        for (gk, gv), (k, v) in zip(got, states, strict=True):
            assert torch.equal(gk[..., t, :], k[..., t, :].half().float())
            assert torch.equal(gv[..., t, :], v[..., t, :].half().float())
            for near in (t - 1, t + 1):
                assert not torch.equal(gv[..., near, :], v[..., near, :].half().float())
                assert not torch.equal(gk[..., near, :], k[..., near, :].half().float())
    # quantized as one block (the token inside its neighbours' groups) would be different numbers
    whole = _by_hand(states, [(0, 48, kb, vb)])
    assert not torch.equal(got[0][0], whole[0][0])
    assert cache.blocks[-1].protected_tokens == 1 and cache.blocks[-1].protect_bits == (pk, pv)


def test_keep_dequantized_gives_the_same_attention_inputs_over_several_blocks():
    masks = [[i % 7 == 0 for i in range(40)], [False] * 24, [i >= 20 for i in range(32)]]
    seen = []
    for keep in (False, True):
        cache = _cache(sink_tokens=6, keep=keep)
        for b, mask in enumerate(masks):
            _feed(cache, _states(len(mask), seed=10 + b))
            cache.commit(2 if b != 1 else (4, 2), protect=mask, protect_bits=16 if b != 2 else 8)
        seen.append(_seen(cache, _states(1, seed=99)))
        if keep:
            for layer in cache.layers:  # the kept floats are what the codes dequantize to
                kept_k, kept_v = layer.dequantized
                assert kept_k.shape[-2] == 96
    _assert_equal(seen[1], seen[0])


def test_layer_commit_with_protect_matches_the_cache_commit():
    states = _states(40, seed=4)
    mask = [i in (5, 6, 30) for i in range(40)]
    cache, got = _commit_and_read(states, 3, sink=2, protect=mask)
    by_layer = _cache(sink_tokens=2)
    _feed(by_layer, states)
    for layer in by_layer.layers:
        layer.commit(3, 3, 2, protect=mask, protect_bits=(16, 16))
    seen = _seen(by_layer, _states(1, seed=99))
    _assert_equal([(k[..., :40, :], v[..., :40, :]) for k, v in seen], got)
    _assert_equal(got, _by_hand(states, [(0, 2, 16, 16), (2, 3, 3, 3), (5, 2, 16, 16), (7, 23, 3, 3),
                                         (30, 1, 16, 16), (31, 9, 3, 3)]))


# ------------------------------------------------------------------------------------------ bookkeeping
def test_average_bits_counts_protected_tokens_and_never_sinks():
    cache = _cache(sink_tokens=20)
    _feed(cache, _states(16, seed=5))
    cache.commit(2, protect=[True] * 16)  # all sinks: nothing protected
    assert cache.blocks[-1].protected_tokens == 0 and cache.blocks[-1].sink_tokens == 16
    _feed(cache, _states(32, seed=6))
    mask = [True] * 6 + [False] * 10 + [True] * 3 + [False] * 13  # tokens 16-19 are sinks: 2 + 3 protected
    cache.commit(2, protect=mask, protect_bits=(8, 4))
    assert cache.blocks[-1] == CommittedBlock(2, 2, 32, 4, (), 5, (8, 4))
    _feed(cache, _states(16, seed=7))
    cache.commit((4, 2), protect=[i < 4 for i in range(16)])
    assert cache.blocks[-1].protected_tokens == 4 and cache.blocks[-1].sink_tokens == 0
    # by hand: 20 sinks at 16; block 2: 5 at (8+4)/2 = 6, 23 at 2; block 3: 4 at 16, 12 at (4+2)/2 = 3
    want = (20 * 16 + 5 * 6 + 23 * 2 + 4 * 16 + 12 * 3) / 64
    assert cache.average_bits() == pytest.approx(want)
    assert [b for b, _ in cache.block_bits] == [2, 2, 3]  # the block's setting, as before


def test_nbytes_grows_with_every_token_protected_at_16():
    states = _states(64, seed=8)
    sizes = []
    for marked in (0, 1, 8, 32):
        cache = _cache()
        _feed(cache, states)
        cache.commit(2, protect=[i < marked for i in range(64)])
        sizes.append(cache.nbytes(False))
        assert cache.blocks[-1].protected_tokens == marked
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert sizes == [_hand_nbytes([(marked, 16), (64 - marked, 2)]) for marked in (0, 1, 8, 32)]


def _hand_nbytes(runs) -> int:
    """Bytes of runs ``(tokens, bits)`` by hand: fp16 K and V at 16 bits; else packed codes plus an fp16
    scale and zero per key group (channel x GROUP tokens) and per value group (token x GROUP channels)."""
    per_layer = 0
    for n, bits in runs:
        if not n:
            continue
        if bits == 16:
            per_layer += 2 * HEADS * n * DIM * 2
            continue
        codes = HEADS * n * DIM * bits // 8
        per_layer += codes + 4 * HEADS * -(-n // GROUP) * DIM  # keys
        per_layer += codes + 4 * HEADS * n * -(-DIM // GROUP)  # values
    return LAYERS * per_layer


def test_wrong_length_mask_is_a_clear_error_and_commits_nothing():
    cache = _cache(sink_tokens=2)
    _feed(cache, _states(20, seed=9))
    for bad in ([True] * 19, [False] * 21, torch.ones(5, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"one bool per pending token \(20\)"):
            cache.commit(2, protect=bad)
    assert cache.blocks == [] and cache.pending_length == 20
    cache.commit(2, protect=torch.arange(20) % 2 == 1)  # a tensor mask of the right length works
    assert cache.blocks[-1].protected_tokens == 9  # token 1 is a sink


# ------------------------------------------------------------------------------------ on the tiny model
def test_protecting_every_token_at_16_matches_an_fp16_cache_on_the_model():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 140), generator=torch.Generator().manual_seed(1))
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=4)
    plain = MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=4)
    fp16 = MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=4)
    with torch.no_grad():
        for start in (0, 64):
            for c in (cache, plain, fp16):
                model(ids[:, start : start + 64], **with_cache(model, c))
            cache.commit(2, protect=[True] * 64)
            plain.commit(2)
            fp16.commit(16)
        tail = ids[:, 128:]
        ours, low, full = (model(tail, **with_cache(model, c)).logits for c in (cache, plain, fp16))
    assert torch.equal(ours, full)
    assert (low - full).abs().max() > 1e-3  # 2 bits would change the logits
    assert cache.average_bits() == 16 and [b.protected_tokens for b in cache.blocks] == [60, 64]
