"""BatchedKVCache: N independent ``MixedPrecisionKVCache`` rows seen as one batch for one forward.

Why: a batched vector env runs the current block of N episodes in one model forward, but every
episode keeps its own cache and commits its own bits. This cache owns no storage: for one forward it
wraps the N row caches; each layer's ``update`` appends row r's real new keys/values (the first
``new_tokens[r]`` of the padded block) to row r's own :class:`~quant.kv_cache.MixedPrecisionLayer`
(the same storage and quantizer as a single episode) and returns all rows' dequantized keys/values
stacked, each row's ``[history, new tokens]`` starting at slot 0 and zero-padded on the right.

Rows differ in history length and block length, so the model needs per-row positions and a mask:
:meth:`BatchedKVCache.position_ids` and :meth:`BatchedKVCache.attention_mask` give both (a query of
row r at block offset i sees the row's slots ``[0, history_r + i]``; padded slots are never seen;
a padding query sees slot 0 only, so its softmax stays finite). Pass the 4D mask as
``attention_mask``: transformers uses a 4D mask as given. Both take a per-row layout of the new
tokens (positions and which new tokens each sees), so a forward can also score several
continuations per row, packed side by side, against every row's cache at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from quant.kv_cache import MixedPrecisionKVCache, MixedPrecisionLayer

__all__ = ["BatchedKVCache"]


class _BatchedLayer(CacheLayerMixin):
    """Layer ``i`` of every row: splits the batch, updates each row's layer, stacks the results."""

    is_sliding = False

    def __init__(self, rows: list[MixedPrecisionLayer], past: list[int], new: list[int]):
        super().__init__()
        self.rows, self.past, self.new = rows, past, new
        self.width = max(p + n for p, n in zip(past, new, strict=True))
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # rows initialise themselves
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch, heads, _, _ = key_states.shape
        if batch != len(self.rows):
            raise ValueError(f"batched forward of {batch} rows on a cache of {len(self.rows)}")
        keys = key_states.new_zeros((batch, heads, self.width, key_states.shape[-1]))
        values = value_states.new_zeros((batch, value_states.shape[1], self.width, value_states.shape[-1]))
        for r, (layer, n) in enumerate(zip(self.rows, self.new, strict=True)):
            if n == 0:
                continue
            k, v = layer.update(key_states[r : r + 1, :, :n], value_states[r : r + 1, :, :n])
            keys[r, :, : k.shape[-2]] = k[0]
            values[r, :, : v.shape[-2]] = v[0]
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
    input is all padding and its cache is untouched).
    """

    def __init__(self, rows: Sequence[MixedPrecisionKVCache], new_tokens: Sequence[int]):
        if len(rows) != len(new_tokens) or not rows:
            raise ValueError(f"need one new-token count per row, got {len(new_tokens)} for {len(rows)} rows")
        for row in rows:
            if not isinstance(row, MixedPrecisionKVCache):
                raise TypeError(f"rows must be MixedPrecisionKVCache, got {type(row).__name__}")
        self.rows = list(rows)
        self.new_tokens = [int(n) for n in new_tokens]
        self.past = [row.get_seq_length() for row in self.rows]
        n_layers = len(self.rows[0].layers)
        super().__init__(
            layers=[
                _BatchedLayer([row.layers[i] for row in self.rows], self.past, self.new_tokens)
                for i in range(n_layers)
            ]
        )

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
