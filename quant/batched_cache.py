"""BatchedKVCache: N independent ``MixedPrecisionKVCache`` rows seen as one batch for one forward.

Why: a batched vector env runs the current block of N episodes in one model forward, but every
episode keeps its own cache and commits its own bits. This cache owns no storage: for one forward it
wraps the N row caches; each layer's ``update`` appends row r's real new keys/values (the first
``new_tokens[r]`` of the padded block) to row r's own :class:`~quant.kv_cache.MixedPrecisionLayer`
(the same storage and quantizer as a single episode) and returns all rows' dequantized keys/values
stacked, each row's ``[history, new tokens]`` starting at slot 0 and zero-padded on the right.

With a :class:`RowKVStore` the rows' kept floats (``keep_dequantized``) live in one buffer,
``[layers, rows, heads, capacity, dim]``, row r's cache using row r of it. A forward then writes every
row's new keys/values with one indexed copy per layer and hands attention a view of the buffer, instead of
two appends and a copy of each row's whole history into a fresh batch per row and layer; a commit writes
every layer's dequantized block with one copy. On a GPU each op is a kernel launch, and the ops per row
are what bound the batched env there (issue 14's op count, ``bench_throughput --count-ops``).

Rows differ in history length and block length, so the model needs per-row positions and a mask:
:meth:`BatchedKVCache.position_ids` and :meth:`BatchedKVCache.attention_mask` give both (a query of
row r at block offset i sees the row's slots ``[0, history_r + i]``; padded slots are never seen;
a padding query sees slot 0 only, so its softmax stays finite). Pass the 4D mask as
``attention_mask``: transformers uses a 4D mask as given. Both take a per-row layout of the new
tokens (positions and which new tokens each sees), so a forward can also score several
continuations per row, packed side by side, against every row's cache at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from quant.kv_cache import MixedPrecisionKVCache, MixedPrecisionLayer, is_row_view

__all__ = ["BatchedKVCache", "RowKVStore"]


class RowKVStore:
    """The kept floats of N row caches: one ``[layers, N, heads, capacity, dim]`` buffer for keys and one for
    values; layer l of row r's cache (:meth:`attach`) keeps its committed and pending tokens in ``[l, r]``.

    Why: a batched forward can then append every row's block with one indexed write per layer and read all
    rows as one view (:class:`BatchedKVCache` with ``store``), and a commit writes the dequantized block of
    every layer with one copy (:meth:`write_block`), where separate buffers cost a few ops per row and layer
    (each a kernel launch on a GPU). The buffers start zeroed (attention never sees a padded slot, but a NaN
    there would still poison its masked product), grow by doubling for every row and layer at once, and
    every attached layer is re-pointed when they move. A row's storage belongs to the cache attached last:
    attaching a new one detaches the old (:meth:`MixedPrecisionLayer.detach_kept`)."""

    def __init__(self, rows: int):
        if rows < 1:
            raise ValueError(f"a row store needs at least one row, got {rows}")
        self.rows = rows
        self.layers: int | None = None  # from the first cache attached
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._by_layer: list[tuple[torch.Tensor, torch.Tensor]] = []  # [N, heads, capacity, dim] views per layer
        # (layer, row) -> [1, heads, capacity, dim] views, and a zero-token pair: cut once per allocation (see row)
        self._rows: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None
        self._attached: list[MixedPrecisionKVCache | None] = [None] * rows

    @property
    def capacity(self) -> int:
        """Tokens every row can hold now (0 before the first allocation)."""
        return 0 if self._keys is None else self._keys.shape[3]

    def attach(self, row: int, cache: MixedPrecisionKVCache) -> None:
        """Make ``cache`` (a fresh one, nothing kept yet) keep its floats in row ``row``."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} of a store of {self.rows} rows")
        if not cache.keep_dequantized:
            raise ValueError("only a cache with keep_dequantized=True keeps floats to share")
        if self.layers is None:
            self.layers = len(cache.layers)
        elif len(cache.layers) != self.layers:
            raise ValueError(f"a store of {self.layers} layers cannot hold a cache of {len(cache.layers)}")
        old = self._attached[row]
        if old is not None and old is not cache:
            for layer in old.layers:
                layer.detach_kept()
        for index, layer in enumerate(cache.layers):
            layer.kept_slot = _Slot(self, row, index)
        self._attached[row] = cache

    def reserve(
        self, layer: int, tokens: int, key_shape: Sequence[int], value_shape: Sequence[int], dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer ``layer``'s (keys, values) buffers, ``[N, heads, capacity >= tokens, dim]``, made or grown as
        needed; None when the store holds another shape (heads, dim), dtype or device than asked."""
        if self.layers is None:
            raise RuntimeError("attach a cache to the store before asking it for buffers")
        if self._keys is None:
            with torch.inference_mode():  # as the layers' own kept buffers: written only in inference mode
                self._keys, self._values = (
                    torch.zeros((self.layers, self.rows, s[-3], tokens, s[-1]), dtype=dtype, device=device)
                    for s in (key_shape, value_shape)
                )
            self._allocated()
        keys, values = self._keys, self._values
        if (keys.shape[2], keys.shape[4], values.shape[2], values.shape[4]) != (
            key_shape[-3], key_shape[-1], value_shape[-3], value_shape[-1]
        ) or keys.dtype != dtype or keys.device != torch.device(device):
            return None
        if keys.shape[3] < tokens:
            self._grow(max(tokens, 2 * keys.shape[3]))
        return self._by_layer[layer]

    def row(self, layer: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``row`` of layer ``layer``'s (keys, values) buffers, ``[1, heads, capacity, dim]``: cut once per
        allocation and kept, because an episode's first block takes every layer's row (two slices a layer, each
        an op, per episode otherwise)."""
        found = self._rows.get((layer, row))
        if found is None:
            keys, values = self._by_layer[layer]
            found = self._rows[(layer, row)] = (keys[row : row + 1], values[row : row + 1])
        return found

    @property
    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-token (keys, values), ``[1, heads, 0, dim]``: the pending tokens of a layer that adopts its row."""
        return self._empty

    def _allocated(self) -> None:
        """The buffers are new: cut the per-layer views again and forget the per-row ones."""
        self._by_layer = list(zip(self._keys.unbind(0), self._values.unbind(0), strict=True))
        self._rows = {}
        self._empty = (self._keys[0, :1, :, :0], self._values[0, :1, :, :0])

    def holds(self, layer: int, row: int, kept: torch.Tensor) -> bool:
        """Whether ``kept`` is row ``row`` of layer ``layer``'s keys buffer (no tensor op)."""
        return bool(self._by_layer) and is_row_view(self._by_layer[layer][0], row, kept)

    def write_block(self, layers: Sequence[MixedPrecisionLayer], keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Write a committed block's dequantized ``keys`` and ``values`` (``[len(layers), heads, tokens, dim]``,
        any layers of any rows' caches) right after each layer's kept tokens, with one indexed write each;
        False (nothing written) when some layer does not keep its floats here or the block does not fit: the
        layers then write their own. Several rows' layers come together when rows commit the same setting
        (:meth:`~quant.kv_cache.MixedPrecisionKVCache.commit_rows`)."""
        if not layers:
            return False
        n = keys.shape[-2]
        where = []  # (layer, row, first token) of each layer's block
        for layer in layers:
            slot, kept = layer.kept_slot, layer._kept
            if (not isinstance(slot, _Slot) or slot.store is not self or kept is None
                    or not self.holds(slot.layer, slot.row, kept[0]) or layer._kept_length + n > kept[0].shape[-2]):
                return False
            where.append((slot.layer, slot.row, layer._kept_length))
        with torch.inference_mode():
            index = torch.tensor(where, device=keys.device)
            layer_index, row_index = index[:, :1], index[:, 1:2]
            positions = index[:, 2:] + torch.arange(n, device=keys.device)
            for buffer, block in ((self._keys, keys), (self._values, values)):
                buffer[layer_index, row_index, :, positions] = block.transpose(1, 2)
        return True

    def pending_views(self, row: int, start: int, length: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Row ``row``'s tokens ``[start, start + length)`` of every layer as ``[1, heads, length, dim]`` views,
        keys and values: three ops each for all the layers."""
        return tuple(
            buffer.narrow(1, row, 1).narrow(3, start, length).unbind(0) for buffer in (self._keys, self._values)
        )

    def _grow(self, tokens: int) -> None:
        old_keys, old_by_layer = self._keys, self._by_layer
        used = old_keys.shape[3]
        with torch.inference_mode():
            grown = []
            for old in (self._keys, self._values):
                buffer = old.new_zeros((*old.shape[:3], tokens, old.shape[4]))
                buffer.narrow(3, 0, used).copy_(old)
                grown.append(buffer)
        self._keys, self._values = grown
        self._allocated()
        for row, cache in enumerate(self._attached):
            if cache is None:
                continue
            for index, target in enumerate(cache.layers):
                if target._kept is not None and is_row_view(old_by_layer[index][0], row, target._kept[0]):
                    target.rebind_kept(*self.row(index, row))


@dataclass
class _Slot:
    """Row ``row`` of a :class:`RowKVStore` for layer ``layer`` of one cache (a ``kept_slot``)."""

    store: RowKVStore
    row: int
    layer: int

    def buffers(self, tokens, key_shape, value_shape, dtype, device):
        found = self.store.reserve(self.layer, tokens, key_shape, value_shape, dtype, device)
        if found is None:
            return None
        return self.store.row(self.layer, self.row)

    def holds(self, kept: torch.Tensor) -> bool:
        return self.store.holds(self.layer, self.row, kept)

    def write_block(self, layers, keys, values) -> bool:
        return self.store.write_block(layers, keys, values)


class _BatchedLayer(CacheLayerMixin):
    """Layer ``i`` of every row: splits the batch, updates each row's layer, stacks the results (or, over a
    :class:`RowKVStore`, writes all rows' new tokens at once and returns a view of the store)."""

    is_sliding = False

    def __init__(self, rows: list[MixedPrecisionLayer], past: list[int], new: list[int], index: int,
                 owner: BatchedKVCache):
        super().__init__()
        self.rows, self.past, self.new, self.index, self.owner = rows, past, new, index, owner
        self.width = max(p + n for p, n in zip(past, new, strict=True))
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # rows initialise themselves
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.owner.unpad is not None:
            key_states, value_states = self.owner.unpad(key_states), self.owner.unpad(value_states)
        batch = key_states.shape[0]
        if batch != len(self.rows):
            raise ValueError(f"batched forward of {batch} rows on a cache of {len(self.rows)}")
        found = None
        if self.owner.store is not None and torch.is_inference_mode_enabled():
            found = self._update_in_store(key_states, value_states)
        if found is None:
            found = self._update_each_row(key_states, value_states)
        self.owner.updated(self.index)
        return found

    def _update_each_row(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Each row's layer appends its new tokens; all rows' keys/values copied into a fresh zero-padded batch."""
        batch, heads = key_states.shape[:2]
        keys = key_states.new_zeros((batch, heads, self.width, key_states.shape[-1]))
        values = value_states.new_zeros((batch, value_states.shape[1], self.width, value_states.shape[-1]))
        for r, (layer, n) in enumerate(zip(self.rows, self.new, strict=True)):
            if n == 0:
                continue
            k, v = layer.update(key_states[r : r + 1, :, :n], value_states[r : r + 1, :, :n])
            keys[r, :, : k.shape[-2]] = k[0]
            values[r, :, : v.shape[-2]] = v[0]
        return keys, values

    def _update_in_store(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write every row's new tokens into its row of the store (one indexed write for keys, one for values;
        a padded token lands past its row's tokens, where nothing lives) and return views of the store.
        A row whose layer does not keep its tokens there (its first block, a cropped cache, ...) runs its own
        update and its whole history is copied into its row. None: the store cannot hold this layer."""
        owner = self.owner
        tokens = max(self.past) + key_states.shape[-2]
        found = owner.store.reserve(self.index, tokens, key_states.shape, value_states.shape, key_states.dtype,
                                    key_states.device)
        if found is None:
            return None
        keys, values = found
        rows, positions = owner.store_index(key_states.shape[-2], key_states.device)
        keys[rows, :, positions] = key_states.transpose(1, 2)
        values[rows, :, positions] = value_states.transpose(1, 2)
        for r, (layer, n) in enumerate(zip(self.rows, self.new, strict=True)):
            if n == 0:
                continue
            slot = owner.slots[r]
            if layer._kept is None and not layer._committed and not layer.pending_length and layer.kept_slot == _Slot(
                owner.store, slot, self.index
            ):  # the episode's first block: the row's layer takes its row of the store now
                layer.adopt_kept(*owner.store.row(self.index, slot), owner.store.empty)
            if layer.appends_in_place(keys, values, slot):
                owner.appended(r, self.index, n)  # its pending views are set once the forward is through
                continue
            k, v = layer.update(key_states[r : r + 1, :, :n], value_states[r : r + 1, :, :n])
            keys[slot, :, : k.shape[-2]] = k[0]
            values[slot, :, : v.shape[-2]] = v[0]
        keys, values = keys.narrow(2, 0, self.width), values.narrow(2, 0, self.width)
        if not owner.every_row_in_order:
            index = owner.slot_tensor(key_states.device)
            keys, values = keys.index_select(0, index), values.index_select(0, index)
        return keys, values

    def get_seq_length(self) -> int:
        return self.width

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.width, 0

    def get_max_length(self) -> int:
        return -1


class BatchedKVCache(Cache):
    """One forward over N row caches (see module docstring); built afresh for every forward.

    ``new_tokens[r]``: real tokens of row r in this forward's padded input (0: the row sits out, its
    input is all padding and its cache is untouched). ``store`` and ``slots``: the rows' caches keep their
    floats in ``store`` (:meth:`RowKVStore.attach`), batch row r's in store row ``slots[r]``; every layer
    then reads and writes the store instead of copying each row (module docstring). Same numbers.
    ``unpad``: the forward runs the rows' tokens side by side in one sequence (batch 1, no padding); it takes
    a layer's new keys/values ``[1, heads, total, dim]`` to the padded ``[rows, heads, width, dim]`` this
    cache works in (envs.batched_forward.RowLayout.padded).
    """

    def __init__(self, rows: Sequence[MixedPrecisionKVCache], new_tokens: Sequence[int],
                 store: RowKVStore | None = None, slots: Sequence[int] | None = None,
                 unpad: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if len(rows) != len(new_tokens) or not rows:
            raise ValueError(f"need one new-token count per row, got {len(new_tokens)} for {len(rows)} rows")
        for row in rows:
            if not isinstance(row, MixedPrecisionKVCache):
                raise TypeError(f"rows must be MixedPrecisionKVCache, got {type(row).__name__}")
        if (store is None) != (slots is None):
            raise ValueError("pass both store and slots (the store row of each batch row), or neither")
        if slots is not None and (len(slots) != len(rows) or len(set(slots)) != len(slots)
                                  or not all(0 <= s < store.rows for s in slots)):
            raise ValueError(f"slots must be {len(rows)} distinct rows of the store (0..{store.rows - 1}), got {slots}")
        self.rows = list(rows)
        self.new_tokens = [int(n) for n in new_tokens]
        self.past = [row.get_seq_length() for row in self.rows]
        self.store, self.slots = store, None if slots is None else [int(s) for s in slots]
        self.unpad = unpad
        #: the batch is the store's rows in order, so a view of the store is the batch (no row gathered)
        self.every_row_in_order = store is not None and self.slots == list(range(store.rows))
        self._rows: dict[str, torch.Tensor] = {}  # device (and shape) -> slots as a tensor
        self._positions: dict[tuple[int, str], torch.Tensor] = {}  # (block width, device) -> store positions
        self._appended: dict[int, dict[int, int]] = {}  # batch row -> {layer: tokens appended in the store}
        self._updated: set[int] = set()  # layers whose update ran in this forward
        n_layers = len(self.rows[0].layers)
        super().__init__(
            layers=[
                _BatchedLayer([row.layers[i] for row in self.rows], self.past, self.new_tokens, i, self)
                for i in range(n_layers)
            ]
        )

    def appended(self, row: int, layer: int, new: int) -> None:
        """Layer ``layer`` of batch row ``row`` took ``new`` tokens in place in the store; its pending views
        are set by :meth:`finish` (for all the row's layers at once when all took them)."""
        self._appended.setdefault(row, {})[layer] = new

    def updated(self, layer: int) -> None:
        """Layer ``layer`` ran its update; after the last layer the forward's appends are finished."""
        self._updated.add(layer)
        if len(self._updated) == len(self.layers):
            self.finish()

    def finish(self) -> None:
        """Point every row's pending keys/values at the tokens the forward appended in the store: one view of
        all its layers cut per layer (a few ops a row, :meth:`RowKVStore.pending_views`) where every layer
        appended, else layer by layer. Runs by itself once every layer has updated; idempotent."""
        n_layers = len(self.layers)
        for row, by_layer in self._appended.items():
            layers = self.rows[row].layers
            start = layers[0]._kept_length
            pending = layers[0].pending_length
            if len(by_layer) == n_layers and all(
                layer._kept_length == start and layer.pending_length == pending for layer in layers
            ):
                keys, values = self.store.pending_views(self.slots[row], start, pending + by_layer[0])
                for layer, k, v in zip(layers, keys, values, strict=True):
                    layer.keys, layer.values = k, v
            else:
                for index, new in by_layer.items():
                    layers[index].extend_pending(new)
        self._appended = {}

    def store_index(self, block_width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows [N, 1], positions [N, block_width])``: where each new token goes in the store, made once
        per forward and shared by every layer."""
        key = (block_width, str(device))
        if key not in self._positions:
            past = torch.tensor(self.past, device=device).unsqueeze(1)
            self._positions[key] = past + torch.arange(block_width, device=device).unsqueeze(0)
        return self.slot_tensor(device, column=True), self._positions[key]

    def slot_tensor(self, device, column: bool = False) -> torch.Tensor:
        """The store row of each batch row: [N] (or [N, 1] with ``column``)."""
        key = f"{device}:{column}"
        if key not in self._rows:
            rows = torch.tensor(self.slots, device=device)
            self._rows[key] = rows.unsqueeze(1) if column else rows
        return self._rows[key]

    @property
    def width(self) -> int:
        """Key slots attention sees: the longest row's history + its new tokens."""
        return self.layers[0].width

    def position_ids(self, block_width: int, device=None, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """[N, block_width]: row r's block continues its own sequence at position ``past[r]``.

        ``offsets``: [N, block_width] each new token's position after its row's history instead of
        ``0, 1, 2, ...`` (several continuations packed into one row each restart at 0)."""
        past = torch.tensor(self.past, device=device).unsqueeze(1)
        if offsets is None:
            return past + torch.arange(block_width, device=device).unsqueeze(0)
        if offsets.shape != (len(self.rows), block_width):
            raise ValueError(f"offsets must be [{len(self.rows)}, {block_width}], got {list(offsets.shape)}")
        return past + offsets.to(device)

    def attention_mask(
        self, block_width: int, dtype: torch.dtype, device=None, visible: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[N, 1, block_width, width] additive mask: 0 where a query may attend, the dtype's min elsewhere.

        A query sees its row's whole history and, among the row's new tokens, those ``visible`` marks:
        [N, block_width, block_width] bool, query by new token (default causal: itself and the ones
        before it; continuations packed into one row see only their own tokens)."""
        n_rows = len(self.rows)
        past = torch.tensor(self.past, device=device).view(-1, 1, 1)
        new = torch.tensor(self.new_tokens, device=device).view(-1, 1, 1)
        query = torch.arange(block_width, device=device).view(1, -1, 1)
        slot = torch.arange(self.width, device=device).view(1, 1, -1)
        if visible is None:  # causal (every block step): two comparisons, no gather
            allowed = (slot <= past + query) & (query < new)
        else:
            if visible.shape != (n_rows, block_width, block_width):
                raise ValueError(f"visible must be [{n_rows}, {block_width}, {block_width}], got {list(visible.shape)}")
            offset = slot - past  # [N, 1, width]: a slot's place among its row's new tokens
            in_block = (offset >= 0) & (offset < new)
            among_new = torch.gather(
                visible.to(device), 2, offset.clamp(0, block_width - 1).expand(n_rows, block_width, self.width)
            )
            allowed = ((slot < past) | (in_block & among_new)) & (query < new)
        allowed = allowed | ((query >= new) & (slot == 0))  # padding queries: one harmless slot
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask.unsqueeze(1)
