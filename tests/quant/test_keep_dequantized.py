"""MixedPrecisionKVCache(keep_dequantized=True): the kept floats are always a fresh dequantization,
and the model computes exactly the same numbers as without them."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_llama import tiny_llama

from envs.cache_kwarg import with_cache
from quant.kv_cache import KEY_AXIS, MixedPrecisionKVCache
from quant.uniform import dequantize_cat

GROUP = 16

# (block sizes, bits per block, sink tokens): merges, partial groups, key/value pairs, fp16 blocks
CASES = [
    ((16, 16, 16, 16), (4, 4, 2, 16), 0),
    ((16, 20, 12, 16, 9), ((4, 2), (4, 2), 8, 3, 2), 0),
    ((16, 16, 16, 7), (2, (8, 4), 16, 4), 5),
    ((30, 34, 16), (16, 2, 2), 40),  # sinks across two blocks
]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(3))
    return model, ids


def _fresh(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The committed tokens dequantized from the stored codes, as the cache without the option does."""
    out = []
    for name in ("keys", "values"):
        parts = [getattr(s, name) for s in layer.segments]
        shape = list(parts[0].shape)
        shape[KEY_AXIS] = layer.committed_length
        out.append(dequantize_cat(parts, torch.empty(shape, dtype=layer.dtype), dim=KEY_AXIS))
    return out[0], out[1]


def _assert_kept_is_fresh(cache: MixedPrecisionKVCache) -> None:
    for layer in cache.layers:
        kept = layer.dequantized
        assert kept is not None and kept[0].shape[KEY_AXIS] == layer.committed_length
        fresh = _fresh(layer)
        assert torch.equal(kept[0], fresh[0]) and torch.equal(kept[1], fresh[1])


def _run(model, cache, ids, blocks, bits) -> list[torch.Tensor]:
    """Every block's logits, committing block i at ``bits[i]`` after it ran."""
    logits, start = [], 0
    with torch.inference_mode():
        for size, b in zip(blocks, bits, strict=True):
            logits.append(model(ids[:, start : start + size], **with_cache(model, cache)).logits)
            cache.commit(b)
            start += size
    return logits


@pytest.mark.parametrize("blocks, bits, sink", CASES)
def test_kept_floats_equal_a_fresh_dequantization_and_the_logits_do_not_change(tiny, blocks, bits, sink):
    model, ids = tiny
    kept = MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=sink, keep_dequantized=True)
    plain = MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=sink)
    for a, b in zip(_run(model, kept, ids, blocks, bits), _run(model, plain, ids, blocks, bits), strict=True):
        assert torch.equal(a, b)
    _assert_kept_is_fresh(kept)
    assert kept.nbytes() == plain.nbytes() and kept.nbytes(False) == plain.nbytes(False)  # codes are the truth
    assert plain.dequantized_nbytes() == 0
    layer = kept.layers[0]
    floats = len(kept.layers) * 2 * layer.dequantized[0].numel() * 4  # fp32 keys and values of the committed tokens
    assert floats <= kept.dequantized_nbytes() <= 2 * floats  # spare capacity: at most the doubling
    # decoding on: a few tokens pending, then one more commit
    n = sum(blocks)
    with torch.inference_mode():
        for t in range(3):
            tok = ids[:, n + t : n + t + 1]
            assert torch.equal(
                model(tok, **with_cache(model, kept)).logits, model(tok, **with_cache(model, plain)).logits
            )
    kept.commit(4)
    plain.commit(4)
    _assert_kept_is_fresh(kept)


def test_crop_branch_copy_and_reset_keep_the_floats_right(tiny):
    model, ids = tiny
    blocks, bits = (16, 16, 10), (4, (4, 2), 2)
    kept = MixedPrecisionKVCache(config=model.config, group_size=GROUP, keep_dequantized=True)
    plain = MixedPrecisionKVCache(config=model.config, group_size=GROUP)
    for cache in (kept, plain):
        _run(model, cache, ids, blocks, bits)
    before = [tuple(t.clone() for t in layer.dequantized) for layer in kept.layers]
    with torch.inference_mode():
        nxt = ids[:, 42:50]
        for cache in (kept, plain):  # pending tokens, then crop them back
            model(nxt, **with_cache(model, cache))
            cache.crop(-3)
        assert torch.equal(model(nxt[:, :2], **with_cache(model, kept)).logits,
                           model(nxt[:, :2], **with_cache(model, plain)).logits)
        endings = ids[:, 60:66].expand(3, -1)  # the env's batched scoring: the prefix broadcast along a batch
        with kept.branch(3), plain.branch(3):
            assert torch.equal(model(endings, **with_cache(model, kept)).logits,
                               model(endings, **with_cache(model, plain)).logits)
    for layer, saved in zip(kept.layers, before, strict=True):  # crop and branch leave the kept floats alone
        assert torch.equal(layer.dequantized[0], saved[0]) and torch.equal(layer.dequantized[1], saved[1])
    twin = copy.deepcopy(kept)  # the env's snapshot(): an independent copy that goes on alike
    for cache in (kept, twin, plain):
        cache.commit(8)
    _assert_kept_is_fresh(kept)
    _assert_kept_is_fresh(twin)
    assert twin.layers[0].dequantized[0].data_ptr() != kept.layers[0].dequantized[0].data_ptr()
    with torch.inference_mode():
        tok = ids[:, 80:81]
        a, b, c = (model(tok, **with_cache(model, x)).logits for x in (kept, twin, plain))
    assert torch.equal(a, b) and torch.equal(a, c)
    kept.reset()
    assert kept.dequantized_nbytes() == 0 and all(layer.dequantized is None for layer in kept.layers)


def test_switching_the_option_on_after_commits_rebuilds_the_floats(tiny):
    model, ids = tiny
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP)
    _run(model, cache, ids, (16, 16), (2, 8))
    for layer in cache.layers:
        layer.keep_dequantized = True
    _run(model, cache, ids[:, 32:], (16,), (4,))  # the commit finds nothing kept: rebuilt on the next read
    with torch.inference_mode():
        model(ids[:, 48:50], **with_cache(model, cache))
    _assert_kept_is_fresh(cache)


@pytest.mark.parametrize("bits, sink", [(4, 0), ((4, 2), 5), (2, 40), (16, 3)])
def test_a_stacked_commit_stores_each_layers_own_codes(tiny, bits, sink):
    """MixedPrecisionKVCache.commit quantizes every layer's block at once; the codes must be each layer's own."""
    model, ids = tiny
    kb, vb = (bits, bits) if isinstance(bits, int) else bits
    stacked = MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=sink)
    alone = MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=sink)
    with torch.inference_mode():
        for cache in (stacked, alone):
            model(ids[:, :36], **with_cache(model, cache))
    stacked.commit(bits)
    for layer in alone.layers:
        layer.commit(kb, vb, min(sink, 36))
    for a, b in zip(stacked.layers, alone.layers, strict=True):
        assert len(a.segments) == len(b.segments) == (2 if 0 < sink < 36 and bits != 16 else 1)  # fp16 parts merge
        for sa, sb in zip(a.segments, b.segments, strict=True):
            assert (sa.key_bits, sa.value_bits) == (sb.key_bits, sb.value_bits)
            for qa, qb in ((sa.keys, sb.keys), (sa.values, sb.values)):
                assert qa.shape == qb.shape and torch.equal(qa.data, qb.data)
                for x, y in ((qa.scale, qb.scale), (qa.zero, qb.zero)):
                    assert (x is None) == (y is None) and (x is None or torch.equal(x, y))
        assert a.pending_length == 0
    assert stacked.nbytes() == alone.nbytes()


def test_pending_tokens_are_appended_in_place_and_expected_tokens_allocates_once(tiny):
    """With the prefix kept, a forward writes its new tokens into the kept buffers (attention reads views of
    them, no fresh [committed + pending] tensor per layer), a commit writes the dequantized block over the
    same slots, and ``expected_tokens`` sizes the buffers so a sequence of that length never regrows them."""
    model, ids = tiny
    blocks, bits = (16, 16, 16, 16, 9), (4, (4, 2), 2, 16, 4)
    kept = MixedPrecisionKVCache(config=model.config, group_size=GROUP, keep_dequantized=True,
                                 expected_tokens=sum(blocks))
    plain = MixedPrecisionKVCache(config=model.config, group_size=GROUP)
    layer = kept.layers[0]
    buffers = set()
    with torch.inference_mode():
        start = 0
        for size, b in zip(blocks, bits, strict=True):
            a = model(ids[:, start : start + size], **with_cache(model, kept)).logits
            assert torch.equal(a, model(ids[:, start : start + size], **with_cache(model, plain)).logits)
            if layer._kept is not None:  # from the second block on: the pending tokens sit in the kept buffer
                buffers.add(layer._kept[0].data_ptr())
                assert layer._pending_in_kept()
            kept.commit(b)
            plain.commit(b)
            start += size
    assert len(buffers) == 1  # allocated once, at the size asked for
    assert layer._kept[0].shape[-2] == sum(blocks)
    _assert_kept_is_fresh(kept)
