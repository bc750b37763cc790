"""One model forward over N rows' caches, each row with new tokens of its own.

A row's new tokens are either the next block of its episode (causal, at the positions after its history)
or its endings packed side by side (:class:`envs.scoring.PackedRow`: each ending at the positions right
after the prompt, seeing only the prompt and its own earlier tokens). Both go through
:class:`~quant.batched_cache.BatchedKVCache`, which gives every row its own positions and mask, so the
batched env's step can run the blocks of the rows that go on and score the endings of the rows that end
in the same forward (:meth:`envs.vector.KVPrecisionVectorEnv.step`), and the batched scoring alone is the
same call with packed rows only (:func:`envs.scoring.batched_continuation_logprobs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from envs.cache_kwarg import with_cache
from quant.batched_cache import BatchedKVCache, RowKVStore
from quant.kv_cache import MixedPrecisionKVCache

__all__ = ["RowTokens", "forward_rows", "mask_dtype"]


@dataclass(frozen=True)
class RowTokens:
    """A row's new tokens in a batched forward. ``local`` ([n]): each token's position after the row's history,
    ``visible`` ([n, n] bool): which of the row's new tokens each may see; both None for a block (positions
    0, 1, 2, ... and causal). No token: the row sits out (its cache is untouched)."""

    ids: list[int]
    local: torch.Tensor | None = None
    visible: torch.Tensor | None = None

    def __post_init__(self):
        if (self.local is None) != (self.visible is None):
            raise ValueError("give a row's local positions and visible mask together, or neither (a causal block)")


def mask_dtype(model) -> torch.dtype:
    """The dtype of an additive attention mask for ``model`` (its own, float32 for a quantized model)."""
    return model.dtype if model.dtype.is_floating_point else torch.float32


def forward_rows(
    model, caches: Sequence[MixedPrecisionKVCache], rows: Sequence[RowTokens], store: RowKVStore | None = None,
    slots: Sequence[int] | None = None, output_attentions: bool = False,
):
    """Run every row's new tokens against its own cache (batch 1, appended to like one forward of its own) in
    ONE right-padded forward: ``(the model's output, each row's history length before it)``, row r's logits in
    ``logits[r, :len(rows[r].ids)]``.
    ``store`` and ``slots``: the caches keep their floats in rows ``slots`` of ``store`` (read in place).

    Why one forward: on a GPU a forward is hundreds of kernel launches whatever its batch, so the rows of a
    step share one. The ids, positions and mask are built for all rows at once, a few ops per packed row."""
    if len(caches) != len(rows) or not rows:
        raise ValueError(f"need one row of tokens per cache, got {len(rows)} for {len(caches)} caches")
    device = next(model.parameters()).device
    width = max(len(row.ids) for row in rows)
    if width == 0:
        raise ValueError("every row is empty: nothing to run")
    ids = torch.tensor([row.ids + [0] * (width - len(row.ids)) for row in rows], dtype=torch.long, device=device)
    batch = BatchedKVCache(list(caches), [len(row.ids) for row in rows], store, slots)
    dtype = mask_dtype(model)
    packed = [r for r, row in enumerate(rows) if row.visible is not None and row.ids]
    if not packed:  # every row a causal block: the cache's defaults, no per-row layout
        positions, mask = batch.position_ids(width, device), batch.attention_mask(width, dtype, device)
    else:  # blocks keep 0, 1, 2, ... and the causal mask; packed rows get their own layout over them
        local = torch.arange(width, device=device).expand(len(rows), width).clone()
        visible = torch.ones(width, width, dtype=torch.bool, device=device).tril().expand(len(rows), width, width)
        visible = visible.clone()
        for r in packed:
            n = len(rows[r].ids)
            local[r, :n] = rows[r].local
            visible[r, :n, :n] = rows[r].visible
        positions, mask = batch.position_ids(width, device, local), batch.attention_mask(width, dtype, device, visible)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, **with_cache(model, batch), use_cache=True,
        output_attentions=output_attentions,
    )
    return out, batch.past
