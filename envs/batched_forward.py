"""One model forward over N rows' caches, each row with new tokens of its own.

A row's new tokens are either the next block of its episode (causal, at the positions after its history)
or its endings packed side by side (:class:`envs.scoring.PackedRow`: each ending at the positions right
after the prompt, seeing only the prompt and its own earlier tokens). Both go through
:class:`~quant.batched_cache.BatchedKVCache`, which gives every row its own positions and mask, so the
batched env's step can run the blocks of the rows that go on and score the endings of the rows that end
in the same forward (:meth:`envs.vector.KVPrecisionVectorEnv.step`), and the batched scoring alone is the
same call with packed rows only (:func:`envs.scoring.batched_continuation_logprobs`).

Padding-free (:class:`RowLayout`): the rows' tokens run side by side in ONE sequence, so the linear layers
and the LM head, most of a forward's work, see only real tokens; rows differ in length (a last block is
short, packed endings are 30-160 tokens on HellaSwag against 64 for a block) and right-padding them all to
the longest wasted that work. Only attention needs rows: the cache gets each row's keys/values padded
(:meth:`RowLayout.padded`) and attention (:func:`rows_attention`, the architecture's own eager attention)
runs row by row on a CPU, where it costs its FLOPs, or for all rows at once, padded, on a GPU, where it
costs kernel launches (:func:`attention_by_row`). That is where the model's ``eager`` attention is replaced,
for the forward only; models whose attention does not take the replacement (:func:`packs_rows`) run
right-padded, as before.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import AttentionInterface

from envs.cache_kwarg import with_cache
from quant.batched_cache import BatchedKVCache, RowKVStore
from quant.kv_cache import MixedPrecisionKVCache

__all__ = [
    "ATTEND_BY_ROW", "RowLayout", "RowTokens", "RowsOutput", "attention_by_row", "forward_rows", "mask_dtype",
    "packs_rows", "rows_attention",
]

#: the name :func:`rows_attention` is registered under in transformers' ``AttentionInterface``
ROWS_ATTENTION = "kvgym_rows"


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


@dataclass(frozen=True)
class RowLayout:
    """Where N rows' new tokens sit in one padding-free sequence, and how attention gets its rows back.

    The sequence is row 0's tokens, then row 1's, ... (``total`` tokens). ``tokens`` ([total]): each token's
    slot ``r * width + c`` in the right-padded ``[rows, width]`` layout the cache and the mask use;
    ``padding`` ([rows * width]): the sequence index of each padded slot (0 for padding, which nothing sees).
    ``groups``: ``(first row, end row, width, keys)`` of the rows attended together (each group padded to its
    own longest row, seeing its own longest history + new tokens);
    ``attention`` ([sum of rows * width over groups]) and ``scatter`` ([total]) take the queries into the groups'
    padded layout and the attention output back to the sequence.

    On a CPU every row is a group of its own: there attention costs its FLOPs, and rows' histories differ
    (0 to ~600 keys on 5-shot HellaSwag), so padding them to the longest doubled attention's work. On a GPU
    every group costs kernel launches (the ops that bound the batched env there), so all rows are one."""

    rows: int
    width: int
    tokens: torch.Tensor
    padding: torch.Tensor
    groups: tuple[tuple[int, int, int, int], ...]
    attention: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def of(cls, rows: Sequence[RowTokens], past: Sequence[int], device, per_row: bool = False) -> RowLayout:
        """``per_row``: every row is a group of its own (attention runs row by row, nothing padded), else all
        rows are one group."""
        lengths = [len(row.ids) for row in rows]
        width = max(lengths)
        seen = [max(p + n, 1) for p, n in zip(past, lengths, strict=True)]
        if per_row:
            groups = [(r, r + 1, max(n, 1), k) for r, (n, k) in enumerate(zip(lengths, seen, strict=True))]
        else:
            groups = [(0, len(rows), width, max(seen))]
        tokens, attention, scatter, start, offset = [], [], [], 0, 0
        for first, end, w, _ in groups:
            for r in range(first, end):
                n = lengths[r]
                tokens += range(r * width, r * width + n)
                scatter += range(offset + (r - first) * w, offset + (r - first) * w + n)
                attention += list(range(start, start + n)) + [0] * (w - n)
                start += n
            offset += (end - first) * w
        padding = torch.zeros(len(rows) * width, dtype=torch.long)
        padding[torch.tensor(tokens, dtype=torch.long)] = torch.arange(len(tokens))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return cls(len(rows), width, as_tensor(tokens), padding.to(device), tuple(groups), as_tensor(attention),
                   as_tensor(scatter))

    def padded(self, states: torch.Tensor) -> torch.Tensor:
        """``[1, heads, total, dim]`` -> ``[rows, heads, width, dim]`` (padding slots hold some real token)."""
        heads, dim = states.shape[1], states.shape[-1]
        return states.index_select(2, self.padding).view(heads, self.rows, self.width, dim).transpose(0, 1)


def _eager(module):
    """The eager attention of ``module``'s architecture (its modeling file's ``eager_attention_forward``)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def rows_attention(module, query, key, value, attention_mask, row_layout: RowLayout | None = None, **kwargs):
    """The architecture's eager attention, for a padding-free forward (``row_layout``: a :class:`RowLayout`) group
    by group of rows: queries ``[1, heads, total, dim]`` taken into each group's padded rows, keys/values and mask
    as the cache and :func:`forward_rows` give them (``[rows, ...]``), the output back to ``[1, total, heads,
    dim]``. Attention weights: one ``[its rows, heads, width, keys]`` per group (:class:`RowsOutput` reads
    them). Without ``row_layout``, plain eager attention."""
    eager = _eager(module)
    if row_layout is None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    heads, dim = query.shape[1], query.shape[-1]
    queries = query.index_select(2, row_layout.attention).view(heads, -1, dim)
    outputs, weights, start = [], [], 0
    for first, end, width, keys in row_layout.groups:
        rows = end - first
        q = queries if len(row_layout.groups) == 1 else queries[:, start : start + rows * width]
        start += rows * width
        k, v, mask = key, value, attention_mask
        if (first, end) != (0, key.shape[0]):
            k, v, mask = k[first:end], v[first:end], mask[first:end]
        if keys != k.shape[2]:
            k, v, mask = k[:, :, :keys], v[:, :, :keys], mask[..., :keys]
        if width != mask.shape[2]:
            mask = mask[:, :, :width]
        out, w = eager(module, q.view(heads, rows, width, dim).transpose(0, 1), k, v, mask, **kwargs)
        outputs.append(out.reshape(rows * width, *out.shape[2:]))
        weights.append(w)
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out.index_select(0, row_layout.scatter).unsqueeze(0), tuple(weights)


AttentionInterface.register(ROWS_ATTENTION, rows_attention)


def packs_rows(model) -> bool:
    """Whether ``model`` can run rows padding-free: its attention is eager, taken from transformers'
    ``AttentionInterface`` by name (so :func:`rows_attention` can stand in), with its architecture's eager function."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "eager":
        return False
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return False
    attention = next((m for m in model.modules() if type(m).__name__.endswith("Attention")), None)
    return attention is not None and _eager(attention) is not None


#: how a padding-free forward attends: row by row (True), all rows together (False), or by the
#: device (None: row by row on a CPU, see :class:`RowLayout`). The op counts (issue 14) set False: they stand
#: for a GPU's kernel launches, so they count the GPU's layout on any machine.
ATTEND_BY_ROW: bool | None = None


def attention_by_row(device) -> bool:
    """Whether a padding-free forward on ``device`` attends row by row (:data:`ATTEND_BY_ROW`)."""
    return torch.device(device).type == "cpu" if ATTEND_BY_ROW is None else ATTEND_BY_ROW


@contextlib.contextmanager
def _rows_attention_in(model) -> Iterator[None]:
    """The model's attention is :func:`rows_attention` inside (its config names it; restored after)."""
    config = model.config
    before = config._attn_implementation_internal
    config._attn_implementation_internal = ROWS_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation_internal = before


@dataclass(frozen=True)
class RowsOutput:
    """What :func:`forward_rows` gives back: ``flat_logits`` ``[N, vocab]`` every position the forward ran, row r's
    at ``starts[r]`` on (``logits[r]``, its ``[its tokens, vocab]``); ``past`` each row's history length before the
    forward; ``groups`` the rows attended together, ``(first row, end row, width, keys)``; ``attentions`` (None
    unless asked) per layer one map per group, ``[its rows, heads, width, keys]`` (:meth:`row_maps` cuts a row's)."""

    flat_logits: torch.Tensor
    starts: list[int]
    lengths: list[int]
    past: list[int]
    groups: tuple[tuple[int, int, int, int], ...]
    attentions: tuple[tuple[torch.Tensor, ...], ...] | None = None

    @cached_property
    def logits(self) -> list[torch.Tensor]:
        """``logits[r]``: row r's ``[its tokens, vocab]`` (a view)."""
        return [self.flat_logits[s : s + n] for s, n in zip(self.starts, self.lengths, strict=True)]

    def runs(self, rows: Sequence[int]) -> list[tuple[list[int], torch.Tensor]]:
        """``rows`` (ascending) cut where their logits stop lying back to back, each run with its rows' logits as
        one ``[their tokens, vocab]`` view: what their next-token statistics take in one pass
        (``envs.features.LogitStats``). Padding-free, only the rows left out cut a run; right-padded, a row
        shorter than the widest too."""
        end = lambda r: self.starts[r] + self.lengths[r]  # noqa: E731
        runs: list[list[int]] = []
        for r in rows:
            if runs and end(runs[-1][-1]) == self.starts[r]:
                runs[-1].append(r)
            else:
                runs.append([r])
        return [(run, self.flat_logits[self.starts[run[0]] : end(run[-1])]) for run in runs]

    def group_of(self, row: int) -> tuple[int, int]:
        """``(group, the row's index in it)``."""
        for g, (first, end, _, _) in enumerate(self.groups):
            if first <= row < end:
                return g, row - first
        raise IndexError(f"row {row} is in no group of {self.groups}")

    def group_maps(self, group: int) -> list[torch.Tensor]:
        """Every layer's map of ``group``, ``[its rows, heads, width, keys]``."""
        if self.attentions is None:
            raise RuntimeError("the forward ran without output_attentions")
        return [layer[group] for layer in self.attentions]

    def row_maps(self, row: int) -> Sequence[torch.Tensor]:
        """Row ``row``'s maps, per layer ``[1, heads, its tokens, its history + tokens]``, cut when read."""
        group, index = self.group_of(row)
        n = self.lengths[row]
        return _RowMaps(self.group_maps(group), index, n, self.past[row] + n)


class _RowMaps(Sequence):
    """Row ``row`` of a group's attention maps, per layer ``[1, heads, tokens, seen]``, cut when read: a step
    whose features take their attention statistics from the whole group (``head_variance``) never pays a cut
    per row and layer (on a GPU each is a kernel launch)."""

    def __init__(self, maps: Sequence[torch.Tensor], row: int, tokens: int, seen: int):
        self.maps, self.row, self.tokens, self.seen = maps, row, tokens, seen

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, layer):
        if isinstance(layer, slice):
            return [self[i] for i in range(*layer.indices(len(self)))]
        return self.maps[layer][self.row : self.row + 1, :, : self.tokens, : self.seen]


def mask_dtype(model) -> torch.dtype:
    """The dtype of an additive attention mask for ``model`` (its own, float32 for a quantized model)."""
    return model.dtype if model.dtype.is_floating_point else torch.float32


def forward_rows(
    model, caches: Sequence[MixedPrecisionKVCache], rows: Sequence[RowTokens], store: RowKVStore | None = None,
    slots: Sequence[int] | None = None, output_attentions: bool = False,
) -> RowsOutput:
    """Run every row's new tokens against its own cache (batch 1, appended to like one forward of its own) in
    ONE forward, padding-free where the model allows it (:func:`packs_rows`, module docstring), else
    right-padded. ``store`` and ``slots``: the caches keep their floats in rows ``slots`` of ``store`` (read in
    place).

    Why one forward: on a GPU a forward is hundreds of kernel launches whatever its batch, so the rows of a
    step share one. The ids, positions and mask are built for all rows at once, a few ops per packed row."""
    if len(caches) != len(rows) or not rows:
        raise ValueError(f"need one row of tokens per cache, got {len(rows)} for {len(caches)} caches")
    device = next(model.parameters()).device
    lengths = [len(row.ids) for row in rows]
    width = max(lengths)
    if width == 0:
        raise ValueError("every row is empty: nothing to run")
    layout, by_row = None, attention_by_row(device)
    if packs_rows(model) and (by_row or min(lengths) < width):  # else nothing is padded: no layout to pay for
        layout = RowLayout.of(rows, [c.get_seq_length() for c in caches], device, per_row=by_row)
    batch = BatchedKVCache(list(caches), lengths, store, slots, None if layout is None else layout.padded)
    dtype = mask_dtype(model)
    packed = [r for r, row in enumerate(rows) if row.visible is not None and row.ids]
    if not packed:  # every row a causal block: the cache's defaults, no per-row layout
        positions, mask = batch.position_ids(width, device), batch.attention_mask(width, dtype, device)
    else:  # blocks keep 0, 1, 2, ... and the causal mask; packed rows get their own layout over them
        local = torch.arange(width, device=device).expand(len(rows), width).clone()
        visible = torch.ones(width, width, dtype=torch.bool, device=device).tril().expand(len(rows), width, width)
        visible = visible.clone()
        for r in packed:
            n = lengths[r]
            local[r, :n] = rows[r].local
            visible[r, :n, :n] = rows[r].visible
        positions, mask = batch.position_ids(width, device, local), batch.attention_mask(width, dtype, device, visible)
    if layout is None:
        ids = torch.tensor([row.ids + [0] * (width - len(row.ids)) for row in rows], dtype=torch.long, device=device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **with_cache(model, batch),
                    use_cache=True, output_attentions=output_attentions)
        flat, starts = out.logits.reshape(-1, out.logits.shape[-1]), [r * width for r in range(len(rows))]
        groups = ((0, len(rows), width, batch.width),)
        attentions = tuple((maps,) for maps in out.attentions) if output_attentions else None
    else:
        ids = torch.tensor([[t for row in rows for t in row.ids]], dtype=torch.long, device=device)
        with _rows_attention_in(model):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions.reshape(1, -1)[:, layout.tokens],
                        **with_cache(model, batch), use_cache=True, output_attentions=output_attentions,
                        row_layout=layout)
        flat, starts = out.logits[0], [0, *itertools.accumulate(lengths)][:-1]
        groups, attentions = layout.groups, out.attentions if output_attentions else None
    return RowsOutput(flat, starts, lengths, batch.past, groups, attentions)
