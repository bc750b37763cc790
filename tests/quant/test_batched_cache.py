"""RowKVStore: N row caches keeping their floats in one buffer give the same numbers as separate caches.

The batched env (envs.vector) runs on it; tests/envs/test_vector.py checks the env against the single env.
Here the store itself: a forward over the store against the copying batched forward (rows of different
lengths, a row sitting out, a batch of some rows only, the buffers growing mid-run, the first block), the
kept floats against a fresh dequantization, a cache that leaves its row (a new episode, a deep copy), and
that the store really saves the per-row work it exists for (fewer torch ops per commit and forward).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_llama import tiny_llama

from envs.cache_kwarg import with_cache
from experiments.bench_throughput import TorchOpCounter
from quant.batched_cache import BatchedKVCache, RowKVStore
from quant.kv_cache import MixedPrecisionKVCache

# per step: (rows that run, tokens each, bits each commits at); a row not listed sits out of the forward
STEPS = [
    ((0, 1, 2), (9, 16, 5), (4, (4, 2), 16)),
    ((0, 1, 2), (16, 16, 16), (2, 4, 4)),
    ((0, 2), (16, 7), ((3, 2), 4)),  # row 1 is not in the batch
    ((0, 1, 2), (4, 16, 16), (8, 2, 2)),
    ((1,), (16,), (4,)),
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _caches(model, n: int) -> list[MixedPrecisionKVCache]:
    return [MixedPrecisionKVCache(config=model.config, group_size=16, sink_tokens=2, keep_dequantized=True,
                                  rotate_keys=True) for _ in range(n)]


def _forward(model, caches, blocks, store=None, slots=None) -> list[torch.Tensor]:
    """One padded forward of each row's block (a 1-D id tensor; empty: the row sits out): each row's logits."""
    width = max(len(b) for b in blocks)
    ids = torch.zeros(len(blocks), width, dtype=torch.long)
    for r, block in enumerate(blocks):
        ids[r, : len(block)] = block
    cache = BatchedKVCache(caches, [len(b) for b in blocks], store, slots)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=cache.attention_mask(width, model.dtype),
                    position_ids=cache.position_ids(width), **with_cache(model, cache), use_cache=True)
    return [out.logits[r, : len(b)] for r, b in enumerate(blocks)]


def _run(model, caches, store=None, batch_all_rows: bool = False) -> list[list[torch.Tensor]]:
    """STEPS over three row caches; each step's logits per running row. ``batch_all_rows``: every row is in
    the batch, the ones not running with no new token (else only the running rows are)."""
    ids = torch.randint(0, 256, (3, 200), generator=torch.Generator().manual_seed(5))
    used, logits = [0, 0, 0], []
    for rows, sizes, bits in STEPS:
        blocks = {r: ids[r, used[r] : used[r] + n] for r, n in zip(rows, sizes, strict=True)}
        batch = list(range(3)) if batch_all_rows else list(rows)
        out = _forward(model, [caches[r] for r in batch], [blocks.get(r, ids[r, :0]) for r in batch],
                       store, None if store is None else batch)
        logits.append([out[batch.index(r)] for r in rows])
        for r, n, b in zip(rows, sizes, bits, strict=True):
            caches[r].commit(b)
            used[r] += n
    return logits


def _assert_kept_is_fresh(cache: MixedPrecisionKVCache) -> None:
    """The kept floats are what the stored codes dequantize to (tests/quant/test_keep_dequantized.py's rule)."""
    for layer in cache.layers:
        fresh = layer._dequantize_segments(layer.segments, layer.dtype)
        for got, want in zip(layer.dequantized, fresh, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_all_rows", [False, True], ids=["running-rows", "all-rows-some-sit-out"])
def test_store_forward_equals_the_copying_forward(model, batch_all_rows):
    plain = _caches(model, 3)
    expected = _run(model, plain, batch_all_rows=batch_all_rows)
    store, shared = RowKVStore(3), _caches(model, 3)
    for row, cache in enumerate(shared):
        store.attach(row, cache)
    got = _run(model, shared, store, batch_all_rows=batch_all_rows)
    for step_got, step_expected in zip(got, expected, strict=True):
        for a, b in zip(step_got, step_expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for row, (a, b) in enumerate(zip(shared, plain, strict=True)):
        assert a.nbytes() == b.nbytes() and a.block_bits == b.block_bits
        assert [len(x.segments) for x in a.layers] == [len(x.segments) for x in b.layers]
        for index, layer in enumerate(a.layers):
            assert store.holds(index, row, layer._kept[0])  # the floats live in the store
        _assert_kept_is_fresh(a)


def test_store_grows_and_rows_follow(model):
    """Growth re-points every row's kept floats and pending tokens, and no token is lost."""
    store, caches = RowKVStore(2), _caches(model, 2)
    for row, cache in enumerate(caches):
        store.attach(row, cache)
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(1))
    capacities = set()
    for step in range(5):
        _forward(model, caches, [ids[0, 16 * step : 16 * step + 16], ids[1, 12 * step : 12 * step + 12]], store, [0, 1])
        capacities.add(store.capacity)
        caches[step % 2].commit(4)  # the other row keeps its tokens pending across a growth
    assert len(capacities) > 1
    for cache in caches:
        pending = cache.layers[0]
        assert pending.pending_length == 0 or pending._pending_in_kept()
    _assert_kept_is_fresh(caches[0])


def test_a_new_cache_takes_the_row_and_the_old_one_still_works(model):
    store, (old, new) = RowKVStore(1), _caches(model, 2)
    store.attach(0, old)
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(2))
    _forward(model, [old], [ids[0, :16]], store, [0])
    old.commit(4)
    _forward(model, [old], [ids[0, 16:24]], store, [0])  # 8 tokens pending in the store's row
    reference = copy.deepcopy(old)
    for layer in reference.layers:  # a deep copy owns its floats, it does not view the store
        assert layer.kept_slot is None and not store.holds(0, 0, layer._kept[0])
    store.attach(0, new)  # the next episode: the row is new's now
    _forward(model, [new], [ids[0, 50:66]], store, [0])
    new.commit(2)
    for layer in old.layers:
        assert layer.kept_slot is None and layer.pending_length == 8
    with torch.inference_mode():
        got = model(ids[:, 24:30], **with_cache(model, old)).logits
        want = model(ids[:, 24:30], **with_cache(model, reference)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_store_saves_per_row_ops(model):
    """What the store is for: a commit writes every layer's floats at once and a forward appends every row's
    block at once, so both issue fewer torch ops than with each row's own buffers. This fails if either
    falls back to the per-layer path."""
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(4))

    def ops(store: RowKVStore | None) -> tuple[int, int]:
        caches = _caches(model, 4)
        if store is not None:
            for row, cache in enumerate(caches):
                store.attach(row, cache)
        slots = None if store is None else [0, 1, 2, 3]
        _forward(model, caches, [ids[r, :16] for r in range(4)], store, slots)
        for cache in caches:
            cache.commit(4)
        _forward(model, caches, [ids[r, 16:32] for r in range(4)], store, slots)
        with TorchOpCounter() as commit:
            caches[0].commit(4)
        for cache in caches[1:]:
            cache.commit(4)
        with TorchOpCounter() as forward:
            _forward(model, caches, [ids[r, 32:48] for r in range(4)], store, slots)
        return commit.ops, forward.ops

    (commit_own, forward_own), (commit_store, forward_store) = ops(None), ops(RowKVStore(4))
    assert commit_store < commit_own
    assert forward_store < forward_own


def test_refusals(model):
    store = RowKVStore(2)
    with pytest.raises(ValueError, match="keep_dequantized"):
        store.attach(0, MixedPrecisionKVCache(config=model.config))
    with pytest.raises(IndexError):
        store.attach(2, _caches(model, 1)[0])
    store.attach(0, _caches(model, 1)[0])
    with pytest.raises(ValueError, match="layers"):
        store.attach(1, MixedPrecisionKVCache(3, keep_dequantized=True))
    caches = _caches(model, 2)
    with pytest.raises(ValueError, match="store and slots"):
        BatchedKVCache(caches, [1, 1], store)
    with pytest.raises(ValueError, match="distinct"):
        BatchedKVCache(caches, [1, 1], store, [1, 1])
    with pytest.raises(ValueError, match="at least one row"):
        RowKVStore(0)


def _codes(cache: MixedPrecisionKVCache) -> list[list[torch.Tensor]]:
    """Every stored tensor of every segment (codes, scales, zero points), layer by layer."""
    return [
        [t for s in layer.segments for q in (s.keys, s.values) for t in (q.data, q.scale, q.zero) if t is not None]
        for layer in cache.layers
    ]


@pytest.mark.parametrize("shared", [True, False], ids=["store", "own-buffers"])
def test_commit_rows_equals_each_commit(model, shared):
    """Rows that commit the same setting together store exactly what each would alone: codes, kept floats,
    bytes and blocks; rows whose blocks do not line up (another length) are committed in their own stack."""
    caches = _caches(model, 4)
    store = RowKVStore(4) if shared else None
    if shared:
        for row, cache in enumerate(caches):
            store.attach(row, cache)
    slots = [0, 1, 2, 3] if shared else None
    ids = torch.randint(0, 256, (4, 100), generator=torch.Generator().manual_seed(6))
    _forward(model, caches, [ids[0, :9], ids[1, :16], ids[2, :5], ids[3, :16]], store, slots)
    for cache, bits in zip(caches, (4, (4, 2), 16, 2), strict=True):  # histories of different lengths
        cache.commit(bits)
    for step, setting in enumerate((4, (3, 2))):
        _forward(model, caches, [ids[r, 20 + 16 * step : 36 + 16 * step - 4 * (r == 3)] for r in range(4)],
                 store, slots)
        alone = copy.deepcopy(caches)  # its own floats: committed one by one
        for cache in alone:
            cache.commit(setting)
        MixedPrecisionKVCache.commit_rows(caches, setting)
        for together, own in zip(caches, alone, strict=True):
            assert together.blocks == own.blocks
            assert together.nbytes() == own.nbytes() and together.fp16_nbytes() == own.fp16_nbytes()
            for a, b in zip(_codes(together), _codes(own), strict=True):
                for x, y in zip(a, b, strict=True):
                    assert torch.equal(x, y)
            for a, b in zip(together.layers, own.layers, strict=True):
                for x, y in zip(a.dequantized, b.dequantized, strict=True):
                    assert torch.equal(x, y)
    if shared:
        for row, cache in enumerate(caches):
            assert all(store.holds(i, row, layer._kept[0]) for i, layer in enumerate(cache.layers))
    for cache in caches:
        _assert_kept_is_fresh(cache)


def test_commit_rows_is_one_commit_per_setting(model):
    """What commit_rows is for: three rows of the store committed together issue no more torch ops than one
    row's commit, and the floats are still written in place (this fails if the store's write falls back)."""
    store, caches = RowKVStore(4), _caches(model, 4)
    for row, cache in enumerate(caches):
        store.attach(row, cache)
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(7))
    _forward(model, caches, [ids[r, :16] for r in range(4)], store, [0, 1, 2, 3])
    MixedPrecisionKVCache.commit_rows(caches, 4)
    _forward(model, caches, [ids[r, 16:32] for r in range(4)], store, [0, 1, 2, 3])
    with TorchOpCounter() as one:
        caches[0].commit(4)
    with TorchOpCounter() as together:
        MixedPrecisionKVCache.commit_rows(caches[1:], 4)
    assert together.ops <= one.ops
    for row, cache in enumerate(caches):
        assert all(store.holds(i, row, layer._kept[0]) for i, layer in enumerate(cache.layers))


def test_commit_rows_refusals(model):
    caches = _caches(model, 2)
    with pytest.raises(ValueError, match="same cache twice"):
        MixedPrecisionKVCache.commit_rows([caches[0], caches[0]], 4)
    with pytest.raises(TypeError, match="MixedPrecisionKVCache"):
        MixedPrecisionKVCache.commit_rows([caches[0], object()], 4)
    with pytest.raises(ValueError, match="nothing pending"):
        MixedPrecisionKVCache.commit_rows(caches, 4)


def test_a_copy_of_a_layer_that_adopted_its_row_copies_no_buffer(model):
    """A layer that adopted its row holds the store's shared zero-token pending pair; a deep copy (a snapshot)
    gets zero-token tensors of its own, not a copy of the storage they view (every row's buffers)."""
    store, (cache,) = RowKVStore(2), _caches(model, 1)
    store.attach(1, cache)
    config = model.config
    shape = (1, config.num_key_value_heads, 16, config.hidden_size // config.num_attention_heads)
    store.reserve(0, 64, shape, shape, torch.float32, torch.device("cpu"))
    layer = cache.layers[0]
    layer.adopt_kept(*store.row(0, 1), store.empty)
    assert layer.pending_length == 0 and layer.keys is store.empty[0]
    copied = copy.deepcopy(layer)
    for tensor in (copied.keys, copied.values):
        assert tensor.shape == (1, shape[1], 0, shape[3]) and tensor.untyped_storage().nbytes() == 0
