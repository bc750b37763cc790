"""MixedPrecisionKVCache(reorder_prefix=True): attention gets the committed tokens grouped by bits, which must be
a permutation of the in-order read (the same numbers) and give the model the same logits up to float rounding."""

from __future__ import annotations

import pytest
import torch
from _tiny_llama import tiny_llama

from envs.cache_kwarg import with_cache
from quant.kv_cache import MixedPrecisionKVCache

GROUP = 16

# (block sizes, bits per block, sink tokens, rotate): alternating widths (no merges), merges, partial groups,
# key/value pairs, fp16 blocks, sinks, rotated keys and values
CASES = [
    ((16, 16, 16, 16, 16), (2, 4, 2, 4, 16), 0, False),
    ((20, 16, 16, 12, 16, 9), ((4, 2), 2, (4, 2), 8, 2, 3), 4, False),
    ((16, 16, 16, 16), (2, (3, 2), 2, (3, 2)), 5, True),
]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 160), generator=torch.Generator().manual_seed(5))
    return model, ids


def _filled(model, ids, blocks, bits, sink, rotate, reorder) -> MixedPrecisionKVCache:
    """The blocks run and committed in order, then reads set to ``reorder``. Filled with ordered reads either
    way, so both caches store the same codes (a reordered read while filling changes the next layers' keys by
    float rounding, which min-max quantization may turn into a different code)."""
    cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP, sink_tokens=sink, rotate_keys=rotate,
                                  rotate_values=rotate)
    start = 0
    with torch.inference_mode():
        for size, b in zip(blocks, bits, strict=True):
            model(ids[:, start : start + size], **with_cache(model, cache))
            cache.commit(b)
            start += size
    for layer in cache.layers:
        layer.reorder_prefix = reorder
    return cache


def _token_order(layer, name: str) -> list[int]:
    """The committed token each position of the reordered read holds: the gathered chunks' ranges, chunk by chunk."""
    return [t for _, ranges in layer.gathered(name).chunks for start, n in ranges for t in range(start, start + n)]


@pytest.mark.parametrize("blocks, bits, sink, rotate", CASES)
def test_the_reordered_read_is_a_permutation_of_the_ordered_one(tiny, blocks, bits, sink, rotate):
    model, ids = tiny
    ordered = _filled(model, ids, blocks, bits, sink, rotate, reorder=False)
    grouped = _filled(model, ids, blocks, bits, sink, rotate, reorder=True)
    new = torch.randn(1, 2, 3, 16, generator=torch.Generator().manual_seed(1))  # 3 pending tokens
    committed = sum(blocks)
    reordered_somewhere = False
    for a, b in zip(ordered.layers, grouped.layers, strict=True):
        keys, values = a.update(new, new + 1)
        keys_r, values_r = b.update(new, new + 1)
        assert _token_order(b, "keys") == _token_order(b, "values")  # each token's key and value at one place
        for name, x, y in (("keys", keys, keys_r), ("values", values, values_r)):
            order = _token_order(b, name)
            assert sorted(order) == list(range(committed))
            reordered_somewhere |= order != list(range(committed))
            expected = x[..., order, :]
            if rotate:  # one matmul per chunk instead of per segment: rounding may differ
                torch.testing.assert_close(y[..., :committed, :], expected, rtol=1e-5, atol=1e-6)
            else:  # the same element-wise arithmetic: the same numbers
                assert torch.equal(y[..., :committed, :], expected)
            assert torch.equal(y[..., committed:, :], x[..., committed:, :])  # pending tokens last, in order
    assert reordered_somewhere
    assert grouped.nbytes() == ordered.nbytes()


@pytest.mark.parametrize("blocks, bits, sink, rotate", CASES)
def test_decoding_gives_the_same_logits(tiny, blocks, bits, sink, rotate):
    model, ids = tiny
    ordered = _filled(model, ids, blocks, bits, sink, rotate, reorder=False)
    grouped = _filled(model, ids, blocks, bits, sink, rotate, reorder=True)
    n = sum(blocks)
    with torch.inference_mode():
        for piece in (ids[:, n : n + 1], ids[:, n + 1 : n + 2], ids[:, n + 2 : n + 7]):  # decode steps, then 5 at once
            a = model(piece, **with_cache(model, ordered)).logits
            b = model(piece, **with_cache(model, grouped)).logits
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
            assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_generate_with_a_policy_gives_the_same_tokens(tiny):
    """The decoding the option is for: ``generate`` with a policy committing blocks at alternating bits (no 8-bit
    blocks: their many levels make a code that float rounding flips, and so a token, likelier)."""
    model, ids = tiny
    texts = []
    for reorder in (False, True):
        widths = iter([2, (4, 2), 4, 16] * 10)
        cache = MixedPrecisionKVCache(config=model.config, group_size=GROUP, interval=GROUP, sink_tokens=4,
                                      policy=lambda _cache, w=widths: next(w), reorder_prefix=reorder)
        with torch.inference_mode():
            out = model.generate(ids[:, :40], **with_cache(model, cache), max_new_tokens=80, do_sample=False,
                                 pad_token_id=0)
        assert len(cache.blocks) >= 5  # several widths committed while decoding
        texts.append(out)
    assert torch.equal(texts[0], texts[1])
