"""MixedPrecisionKVCache: a transformers ``Cache`` whose blocks each keep their own bit-width.

Why a new cache: transformers' ``QuantizedCache`` applies one bit-width to everything, and the
research seeds only simulated precision (quantize, then keep the dequantized floats). Here every
committed block really is stored as packed codes at the bits chosen for it, so the memory an
agent saves is memory the process does not hold.

Life of a token: the model's ``update`` call appends new keys/values to a full-precision *pending*
buffer; :meth:`MixedPrecisionKVCache.commit` quantizes everything pending, in every layer, as one
block (keys per channel over the block's tokens, values per token over the head dimension, as
KIVI). Attention sees the dequantized committed blocks followed by the pending buffer.

Keys and values of a block may have different bits (``commit(key_bits=4, value_bits=2)``): keys are
the sensitive half. With ``sink_tokens=N`` the first N tokens of the sequence are kept in fp16
whatever their block's setting, and outside its quantization groups, so an attention sink's large
activations neither lose precision nor stretch the min-max range of its block (IntactKV, KVQuant).

Consecutive blocks at the same (key, value) bits are merged into one *segment* (when the keys end on
a complete token group), so dequantizing a long uniform cache costs a handful of tensor ops per
layer rather than a handful per block, and every segment is dequantized straight into its slice of the tensor
handed to attention (no per-segment temporaries, no ``torch.cat``). By default the dequantized tensor
lives only for the layer's attention call: between steps the cache holds codes, never floats.

``keep_dequantized=True`` trades that memory for speed: committed segments never change, so each
new block is dequantized once, when it is committed, and appended to a float copy of the committed
prefix that every later forward (a decode step, the env's next block, the batched scoring of the
endings inside :meth:`MixedPrecisionKVCache.branch`) copies instead of dequantizing every segment
again. The floats are exactly what a fresh dequantization gives (the same element-wise arithmetic;
tests/quant/test_keep_dequantized.py checks it after commits, crops, branches and copies), so results do not
change. The cost: the process holds the committed tokens in the model's dtype as well, like a
``DynamicCache`` (:meth:`MixedPrecisionKVCache.dequantized_nbytes`); the codes stay the stored truth
and :meth:`~MixedPrecisionKVCache.nbytes` counts only them. Use it where speed matters more than
resident memory (the env's short episodes); leave it off to measure or bank the memory saving.

``rotate_keys=True`` stores the keys of every quantized run rotated (each head's keys times an
orthonormal Hadamard matrix, :mod:`quant.rotation`; QuaRot) and rotates them back when they are read,
so attention sees keys in their own basis: the same bits and bytes, spread outlier channels.
``rotate_values=True`` does the same for the values (quantized per token, so a few large channels
stretch every token's range: QuaRot's own case).

``reorder_prefix=True`` makes the codes-only read cheaper still. Blocks at alternating bits are
stored as one joined chunk per width (:func:`quant.uniform.gather`), and putting their tokens back in
token order costs a copy per block and the parameters of every block concatenated, on every layer and
decode step. Attention is a sum over keys: any order gives the same result (up to float rounding) when
every query sees every committed token, so the chunks are handed to attention as they are, one after
another.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from quant.rotation import rotation_matrix
from quant.uniform import (
    Gathered,
    QuantizedTensor,
    check_bits,
    concat,
    dequantize,
    dequantize_gathered,
    gather,
    quantize,
    unstack,
)

#: Bits of a block: one width for keys and values, or a (key_bits, value_bits) pair.
BlockBits = int | Sequence[int]

#: A generation-time policy: given the cache (pending length, block bits, ...) return the bits of
#: the pending block (an int, or a (key_bits, value_bits) pair). Called every ``interval`` new tokens
#: when set on the cache.
BitsPolicy = Callable[["MixedPrecisionKVCache"], BlockBits]

KEY_AXIS = -2  # keys share a scale per channel across a group of tokens
VALUE_AXIS = -1  # values share a scale per token across a group of channels


def bit_pair(bits: BlockBits) -> tuple[int, int]:
    """``(key_bits, value_bits)`` of a block setting: an int means both; each must be supported.

    Accepts anything ``int()`` takes (numpy and 0-d torch integers, as policies return) and any
    two-element sequence or 1-d array, so a config's ``[4, 2]`` and a policy's ``(4, 2)`` both work.
    """
    if isinstance(bits, (str, bytes)):
        raise ValueError(f"bits must be an int or a (key_bits, value_bits) pair, got {bits!r}")
    if isinstance(bits, Sequence) or getattr(bits, "ndim", 0) == 1:
        if len(bits) != 2:
            raise ValueError(f"a (key_bits, value_bits) pair needs exactly 2 entries, got {bits!r}")
        pair = []
        for name, b in zip(("key", "value"), bits, strict=True):
            try:
                pair.append(check_bits(b))
            except ValueError as err:
                raise ValueError(f"{name} bits of {bits!r}: {err}") from None
        return pair[0], pair[1]
    b = check_bits(bits)
    return b, b


class CommittedBlock(NamedTuple):
    """One committed block, as the policy chose it; ``sink_tokens`` of its tokens are fp16 regardless.

    A block committed per layer group (:meth:`MixedPrecisionKVCache.commit_groups`) lists each group's
    ``(key_bits, value_bits)`` in ``group_bits`` (groups of equal numbers of consecutive layers), and its
    ``key_bits``/``value_bits`` are the means over groups (floats unless whole); ``group_bits`` is
    empty for a block committed at one setting in every layer. A block committed with ``protect``
    (:meth:`MixedPrecisionKVCache.commit`) keeps ``protected_tokens`` of its tokens at ``protect_bits``.
    """

    key_bits: int | float
    value_bits: int | float
    tokens: int
    sink_tokens: int = 0
    group_bits: tuple[tuple[int, int], ...] = ()
    #: tokens of the block (sinks aside) committed at ``protect_bits`` instead of the block's setting
    protected_tokens: int = 0
    protect_bits: tuple[int, int] = (16, 16)


def layer_groups(num_layers: int, groups: int) -> list[range]:
    """The layers of each of ``groups`` groups of consecutive layers: group g is ``[g*L/G, (g+1)*L/G)``.

    ``groups`` must divide the layer count (every group the same size, so one setting per group
    weighs the same whatever group it goes to); anything else is a ValueError naming the choices.
    """
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"layer_groups must be an integer >= 1, got {groups!r}")
    divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
    if groups > num_layers:
        raise ValueError(
            f"layer_groups={groups} is larger than the model's {num_layers} layers; use one of {divisors}"
        )
    if num_layers % groups:
        raise ValueError(
            f"layer_groups={groups} does not divide the model's {num_layers} layers into equal groups; "
            f"use one of {divisors}"
        )
    size = num_layers // groups
    return [range(g * size, (g + 1) * size) for g in range(groups)]


def _whole(x: float) -> int | float:
    return int(x) if x == int(x) else x


class KeptSlot(Protocol):
    """Where a layer's kept buffers live when several caches share them (``MixedPrecisionLayer.kept_slot``;
    implemented by quant.batched_cache.RowKVStore's rows)."""

    def buffers(
        self, tokens: int, key_shape: Sequence[int], value_shape: Sequence[int], dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's (keys, values) views, [1, heads, capacity >= tokens, dim], their tokens kept when
        the buffers grow; None when these shapes, dtype or device cannot be shared."""

    def holds(self, kept: torch.Tensor) -> bool:
        """Whether ``kept`` is this slot's current keys view."""

    def write_block(self, layers: Sequence[MixedPrecisionLayer], keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Write the dequantized block of ``layers`` (this slot's layer first; the others may be any layers of
        any caches sharing the slot's buffers), stacked ``[len(layers), heads, tokens, dim]``, after each
        layer's kept tokens at once; False: nothing written (then every layer writes its own)."""


def is_row_view(buffer: torch.Tensor, row: int, view: torch.Tensor) -> bool:
    """Whether ``view`` is ``buffer[row : row + 1]`` (pointer, shape, strides and dtype compared; no tensor op,
    so it can run per row, layer and step)."""
    return (
        view.data_ptr() == buffer.data_ptr() + row * buffer.stride(0) * buffer.element_size()
        and view.shape[1:] == buffer.shape[1:]
        and view.shape[0] == 1
        and view.stride()[1:] == buffer.stride()[1:]
        and view.dtype == buffer.dtype
    )


def _empty_like_tokens(t: torch.Tensor) -> torch.Tensor:
    """A zero-token buffer with ``t``'s other dims; unlike ``t[..., :0, :]`` it frees ``t``'s memory."""
    return t.new_empty((*t.shape[:-2], 0, t.shape[-1]))


@dataclass
class _Segment:
    """Consecutive committed tokens of one layer stored at the same key bits and value bits.

    ``key_rotation`` / ``value_rotation``: the keys (values) are stored as ``k @ key_rotation``
    (``rotate_keys``, ``rotate_values``); read them back through :func:`_dequantize_into`, which undoes it.
    None: stored as they are."""

    key_bits: int
    value_bits: int
    keys: QuantizedTensor
    values: QuantizedTensor
    key_rotation: torch.Tensor | None = None
    value_rotation: torch.Tensor | None = None

    def rotation(self, name: str) -> torch.Tensor | None:
        """The rotation the segment's ``name`` ("keys" or "values") are stored in (None: as they are)."""
        return self.key_rotation if name == "keys" else self.value_rotation

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes()


#: A run of a block's consecutive tokens stored at one setting: ``(start, length, key_bits, value_bits)``.
Run = tuple[int, int, int, int]


def block_runs(
    tokens: int, key_bits: int, value_bits: int, sink_tokens: int = 0,
    protect: Sequence[bool] | None = None, protect_bits: tuple[int, int] = (16, 16),
) -> list[Run]:
    """The runs a block of ``tokens`` tokens is stored as: its first ``sink_tokens`` in fp16, the tokens
    ``protect`` marks at ``protect_bits``, the rest at ``(key_bits, value_bits)``; equal neighbours merged.

    Each run is quantized on its own (its own groups and min-max ranges), so a protected token neither
    loses precision to, nor stretches the range of, the low-bit tokens around it."""
    if protect is not None and len(protect) != tokens:
        raise ValueError(f"protect needs one bool per pending token ({tokens}), got {len(protect)}")
    bits = []
    for t in range(tokens):
        if t < sink_tokens:
            bits.append((16, 16))
        elif protect is not None and protect[t]:
            bits.append(protect_bits)
        else:
            bits.append((key_bits, value_bits))
    runs: list[Run] = []
    for t, (kb, vb) in enumerate(bits):
        if runs and runs[-1][2:] == (kb, vb):
            start, length = runs[-1][:2]
            runs[-1] = (start, length + 1, kb, vb)
        else:
            runs.append((t, 1, kb, vb))
    return runs


def _quantize_block(
    keys: torch.Tensor, values: torch.Tensor, runs: Sequence[Run], group_size: int, symmetric: bool,
    rotations: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> list[_Segment]:
    """The segments of one committed block, one per run of :func:`block_runs`.

    Quantization is per group, so the pending keys/values of several layers stacked along the batch
    give, sliced back, exactly each layer's own segments (:meth:`MixedPrecisionKVCache.commit`).
    ``rotations``: (keys', values') matrix (:func:`quant.rotation.rotation_matrix`) or None; the keys (values)
    of every run below 16 bits are quantized in that rotated basis; 16-bit ones (sinks, fp16 marks) are
    stored as they are."""
    tokens = keys.shape[-2]
    new: list[_Segment] = []
    for start, length, kb, vb in runs:
        k, v = keys.narrow(-2, start, length), values.narrow(-2, start, length)
        if length < tokens or keys._base is not None or values._base is not None:
            # a 16-bit part of an fp16 model would be a view keeping the whole buffer alive (and pending tokens
            # kept in place are views of buffers the commit writes the dequantized block into)
            k, v = k.clone(), v.clone()
        key_r = rotations[0] if kb < 16 else None
        value_r = rotations[1] if vb < 16 else None
        if key_r is not None:
            k = k.float() @ key_r  # quantize() computes in float32 anyway
        if value_r is not None:
            v = v.float() @ value_r
        new.append(
            _Segment(
                kb, vb, quantize(k, kb, KEY_AXIS, group_size, symmetric),
                quantize(v, vb, VALUE_AXIS, group_size, symmetric), key_r, value_r,
            )
        )
    return new


def _dequantize_into(
    segments: Sequence[_Segment], name: str, out: torch.Tensor, may_rotate: bool = True,
    gathered: Gathered | None = None,
) -> torch.Tensor:
    """The ``name`` ("keys" or "values") of ``segments``, dequantized and concatenated along the tokens into
    ``out``; rotated ones are rotated back (``x @ R @ R.T = x``), so every reader sees them in their own basis.
    ``gathered``: the segments' ``name`` already gathered (:meth:`MixedPrecisionLayer.gathered`).
    ``may_rotate=False`` (the layer stores that half unrotated) skips the per-segment check: on the per-step
    read it cost ~9% of assembling a 16-segment layer (measured, 30 layers)."""
    if gathered is None:
        gathered = gather([getattr(segment, name) for segment in segments], dim=-2)
    dequantize_gathered(gathered, out)
    if not may_rotate:
        return out
    start = 0
    for segment in segments:
        rotation = segment.rotation(name)
        if rotation is not None:
            part = out.narrow(-2, start, segment.length)
            part.copy_(part.float() @ rotation.T)
        start += segment.length
    return out


class MixedPrecisionLayer(CacheLayerMixin):
    """One layer's storage: committed segments (packed) + a full-precision pending buffer."""

    is_sliding = False
    is_croppable = True

    def __init__(
        self, group_size: int = 64, symmetric: bool = False, keep_dequantized: bool = False,
        rotate_keys: bool = False, rotate_values: bool = False, expected_tokens: int = 0,
        reorder_prefix: bool = False,
    ):
        super().__init__()
        self.group_size = group_size
        self.reorder_prefix = reorder_prefix
        self.symmetric = symmetric
        self.keep_dequantized = keep_dequantized
        self.rotate_keys = rotate_keys
        self.rotate_values = rotate_values
        self._segments: list[_Segment] = []  # see ``segments``
        # committed segments not yet merged into ``_segments``: merging is deferred to the first read of
        # ``segments`` (a keep_dequantized cache may never read them; a merge is six concatenations a layer)
        self._unmerged: list[_Segment] = []
        self._committed = 0  # tokens in ``segments`` (read per layer and step: a running count, not a sum)
        # bytes of the committed codes, and of the same tokens in fp16: running sums too (the env reads them
        # several times a step, and a keep_dequantized cache's segments stay unmerged, one per block)
        self._code_nbytes = 0
        self._code_fp16_nbytes = 0
        # keep_dequantized: the kept buffers' first capacity, so that an episode of known length never grows them
        self.expected_tokens = expected_tokens
        # >1 while the cache is branched along the batch, see MixedPrecisionKVCache.branch
        self.batch_expand = 1
        # keep_dequantized: buffers (keys, values) whose first ``_kept_length`` tokens are the committed
        # tokens dequantized, with spare capacity to append the next blocks (None until the first commit)
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kept_length = 0
        # the committed keys and values gathered for the per-step read (see ``gathered``); reset by a commit
        self._gathered: dict[str, Gathered] = {}
        # keep_dequantized: where the kept buffers come from when they are shared with other caches (a row of
        # quant.batched_cache.RowKVStore, which the batched env reads as one batch); None: the layer's own
        self.kept_slot: KeptSlot | None = None

    # --- transformers CacheLayerMixin contract -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = _empty_like_tokens(key_states)
        self.values = _empty_like_tokens(value_states)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.shape[:2] != key_states.shape[:2] or self.keys.shape[-1] != key_states.shape[-1]:
            if self.keys.shape[-2] == 0 and not self._committed:
                self.lazy_initialization(key_states, value_states)
            else:
                raise ValueError(
                    f"new keys of shape {tuple(key_states.shape)} do not match the cache's "
                    f"(batch, heads, ., head_dim) = {tuple(self.keys.shape)}"
                )
        if self.keep_dequantized and self._committed and self.batch_expand == 1 and torch.is_inference_mode_enabled():
            return self._update_kept(key_states, value_states)  # (the kept buffers are inference tensors)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if not self._committed:
            return self.keys, self.values
        return self._assemble(self.keys, KEY_AXIS), self._assemble(self.values, VALUE_AXIS)

    def _update_kept(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``keep_dequantized``: the pending tokens live in the kept buffers right after the committed floats,
        so a forward appends its new tokens in place and attention reads views of the buffers.

        Why: assembling a fresh ``[committed floats, pending]`` tensor per layer and forward was four
        allocations and copies more than ``DynamicCache``'s ``cat`` (on a GPU each is a kernel launch, and the
        batched env pays them per row: issue 14's profile). A commit quantizes the pending view (cloned
        first, :func:`_quantize_block`) and writes the dequantized block over the same slots. Pending tokens
        that are not there (cropped, restored from a copy) are moved in first."""
        self._dequantized_prefix(key_states.dtype)  # the kept buffers hold exactly the committed tokens
        committed, pending, new = self._kept_length, self.keys.shape[-2], key_states.shape[-2]
        in_place = pending == 0 or self._pending_in_kept()
        self._reserve_kept(committed + pending + new, committed + (pending if in_place else 0))
        keys, values = self._kept
        if not in_place:
            keys.narrow(-2, committed, pending).copy_(self.keys)
            values.narrow(-2, committed, pending).copy_(self.values)
        keys.narrow(-2, committed + pending, new).copy_(key_states)
        values.narrow(-2, committed + pending, new).copy_(value_states)
        self.extend_pending(new)
        total = committed + pending + new
        return keys.narrow(-2, 0, total), values.narrow(-2, 0, total)

    def _pending_in_kept(self) -> bool:
        """Whether the pending keys and values are the views of the kept buffers right after the committed tokens."""
        for pending, buffer in zip((self.keys, self.values), self._kept, strict=True):
            at = buffer.data_ptr() + self._kept_length * buffer.stride(-2) * buffer.element_size()
            if pending.data_ptr() != at or pending.stride() != buffer.stride() or pending.dtype != buffer.dtype:
                return False
        return True

    def _assemble(self, pending: torch.Tensor, axis: int) -> torch.Tensor:
        """Committed segments, dequantized, followed by the pending tokens, in one fresh tensor.

        Every segment is dequantized straight into its slice of the result (no float temporaries,
        no ``torch.cat``): per step and tensor that is a uint8 unpack, one float copy and one in-place
        multiply-add, against ``DynamicCache``'s one ``cat``. The result is transient; only codes are kept.
        """
        committed = self.committed_length
        out = pending.new_empty((*pending.shape[:-2], committed + pending.shape[-2], pending.shape[-1]))
        prefix = self._dequantized_prefix(pending.dtype)
        if prefix is not None:  # keep_dequantized: a copy (broadcast along a branched batch)
            out.narrow(-2, 0, committed).copy_(prefix[0 if axis == KEY_AXIS else 1])
        elif self.reorder_prefix:
            self._dequantize_by_bits("keys" if axis == KEY_AXIS else "values", out.narrow(-2, 0, committed))
        else:
            keys = axis == KEY_AXIS
            name = "keys" if keys else "values"
            _dequantize_into(
                self.segments, name, out.narrow(-2, 0, committed),
                may_rotate=self.rotate_keys if keys else self.rotate_values, gathered=self.gathered(name),
            )
        out.narrow(-2, committed, pending.shape[-2]).copy_(pending)
        return out

    def _dequantize_by_bits(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """``reorder_prefix``: the committed ``name`` dequantized into ``out`` chunk after chunk of
        :meth:`gathered` (the segments of equal bits joined), so grouped by bits and not in token order.

        Each chunk is one unpack and one multiply-add straight into its slice, and a rotated chunk one
        matmul back: a handful of ops per width, against a copy per block (and the parameters of every
        block concatenated) to put the tokens back in order on every read."""
        rotate = self.rotate_keys if name == "keys" else self.rotate_values
        offset = 0
        for qt, _ in self.gathered(name).chunks:
            part = out.narrow(-2, offset, qt.shape[-2])
            dequantize(qt, out=part)
            if rotate and qt.bits < 16:  # every run below 16 bits is stored rotated (_quantize_block)
                part.copy_(part.float() @ rotation_matrix(part.shape[-1], part.device).T)
            offset += qt.shape[-2]
        return out

    def gathered(self, name: str) -> Gathered:
        """The committed ``name`` ("keys" or "values") with the segments of equal bits joined
        (:func:`quant.uniform.gather`), built at the first read after a commit and kept until the next.

        Why: blocks at alternating bits never merge into one segment, and reading them segment by
        segment cost a few tensor ops per segment and step (~60 reads a step for 30 layers). The
        segments are then re-pointed at views of the joined codes, so every code is still held once.
        Keys and values are joined into the same chunks (:meth:`_chunk_labels`), so a read grouped by bits
        (``reorder_prefix``) puts each token's key and value at the same place."""
        found = self._gathered.get(name)
        if found is None:
            found = gather([getattr(segment, name) for segment in self.segments], dim=-2, labels=self._chunk_labels())
            for segment, part in zip(self.segments, found.parts, strict=True):
                setattr(segment, name, part)
            self._gathered[name] = found
        return found

    def _chunk_labels(self) -> list[tuple]:
        """One label per segment for :func:`quant.uniform.gather`: segments join when their (key, value) bits
        and rotations match and no segment with a partial key group (which keys cannot join past) lies
        between them, so the keys' chunks and the values' chunks hold the same tokens."""
        labels, epoch = [], 0
        for segment in self.segments:
            labels.append((segment.key_bits, segment.value_bits, segment.key_rotation is None,
                           segment.value_rotation is None, epoch))
            epoch += not segment.keys.complete_groups
        return labels

    @property
    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``keep_dequantized``: the committed tokens' (keys, values) as kept (views; None when nothing is)."""
        if self._kept is None:
            return None
        return self._kept[0].narrow(-2, 0, self._kept_length), self._kept[1].narrow(-2, 0, self._kept_length)

    def _dequantized_prefix(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept floats of the committed tokens in ``dtype`` (None when not kept).

        Rebuilt from the segments when missing or stale (the option switched on after commits, a
        dtype change), so it always equals a fresh dequantization of what is stored."""
        if not self.keep_dequantized:
            return None
        if self._kept is None or self._kept[0].dtype != dtype or self._kept_length != self.committed_length:
            self._kept, self._kept_length = None, 0
            self._append_dequantized(self.segments, dtype)
        return self.dequantized

    @staticmethod
    def _dequantize_segments(segments: list[_Segment], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``segments`` dequantized into fresh ``dtype`` tensors (keys, values), as ``_assemble`` reads them."""
        out = []
        for name in ("keys", "values"):
            shape = list(getattr(segments[0], name).shape)
            shape[-2] = sum(segment.length for segment in segments)
            buffer = torch.empty(shape, dtype=dtype, device=segments[0].keys.data.device)
            out.append(_dequantize_into(segments, name, buffer))
        return out[0], out[1]

    def _keep_dequantized(self, new: list[_Segment], floats: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """After a commit: append the newly committed segments, dequantized once, to the kept floats."""
        before = self.committed_length - sum(segment.length for segment in new)
        if self._kept is not None and (self._kept[0].dtype != self.dtype or self._kept_length != before):
            self._kept, self._kept_length = None, 0
        if self._kept is None and before:
            return  # nothing usable kept for the older segments: the next read rebuilds it whole
        self._append_dequantized(new, self.dtype, floats)

    def _append_dequantized(
        self, segments: list[_Segment], dtype: torch.dtype, floats: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Dequantize ``segments`` straight into the kept buffers after their first ``_kept_length`` tokens.

        The buffers grow by doubling (a copy of the kept tokens, a logarithmic number of times per
        episode) rather than by a ``torch.cat`` of the whole prefix at every commit. They are written
        in inference mode whatever the caller's mode (the env commits outside it, generation inside):
        they are never part of an autograd graph, only copied into what attention reads."""
        with torch.inference_mode():
            self._append_dequantized_(segments, dtype, floats)

    def _append_dequantized_(
        self, segments: list[_Segment], dtype: torch.dtype, floats: tuple[torch.Tensor, torch.Tensor] | None
    ) -> None:
        n = sum(segment.length for segment in segments)
        need = self._kept_length + n
        if self._kept is None:
            shapes = [list(getattr(segments[0], name).shape) for name in ("keys", "values")]
            device = segments[0].keys.data.device
            shared = None if self.kept_slot is None else self.kept_slot.buffers(
                max(need, self.expected_tokens), shapes[0], shapes[1], dtype, device
            )
            self._kept = shared or tuple(torch.empty((*s[:-2], 0, s[-1]), dtype=dtype, device=device) for s in shapes)
        self._reserve_kept(max(need, self.expected_tokens), self._kept_length)
        kept = self._kept
        for i, name in enumerate(("keys", "values")):
            target = kept[i].narrow(-2, self._kept_length, n)
            if floats is not None:
                target.copy_(floats[i])
            else:
                _dequantize_into(segments, name, target)
        self._kept_length = need

    def _reserve_kept(self, need: int, keep: int) -> None:
        """Make the kept buffers hold at least ``need`` tokens, their first ``keep`` tokens kept: a new pair of
        buffers (of twice the capacity, or ``need``) when they are too short, so growth is a logarithmic number
        of copies per episode."""
        kept = self._kept
        capacity = kept[0].shape[-2]
        if capacity >= need:
            return
        if self.kept_slot is not None and self.kept_slot.holds(kept[0]):  # the shared buffers grow, contents kept
            self._kept = self.kept_slot.buffers(max(need, 2 * capacity), kept[0].shape, kept[1].shape,
                                                kept[0].dtype, kept[0].device)
            return
        grown = []
        for old in kept:
            buffer = old.new_empty((*old.shape[:-2], max(need, 2 * capacity), old.shape[-1]))
            if keep:
                buffer.narrow(-2, 0, keep).copy_(old.narrow(-2, 0, keep))
            grown.append(buffer)
        self._kept = (grown[0], grown[1])

    # --- kept buffers shared with other caches (kept_slot) -------------------------------------
    def appends_in_place(self, keys: torch.Tensor, values: torch.Tensor, row: int) -> bool:
        """Whether this layer's kept buffers are row ``row`` of the shared buffers ``keys`` and ``values``
        ([rows, heads, capacity, dim]) and its next tokens go right after its pending ones there, as
        :meth:`_update_kept` would put them: then a batched forward may write them for every row at once
        and call :meth:`extend_pending`. Python checks only (no tensor op: this runs per row, layer and step)."""
        kept = self._kept
        return (
            kept is not None
            and self.batch_expand == 1
            and self._kept_length == self._committed
            and is_row_view(keys, row, kept[0])
            and is_row_view(values, row, kept[1])
            and (self.pending_length == 0 or self._pending_in_kept())
        )

    def adopt_kept(
        self, keys: torch.Tensor, values: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Before its first token: hold ``keys`` and ``values`` (a row of shared buffers, [1, heads, capacity,
        dim]) as the kept buffers, so that a batched forward writes the first block there too
        (:meth:`appends_in_place`) and the first commit dequantizes it in place. ``empty``: zero-token
        (keys, values) to hold as the pending tokens meanwhile (shared by the rows; default: cut from the row)."""
        if self._committed or self.pending_length:
            raise RuntimeError("adopt_kept() is for a layer that holds no token yet")
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._kept, self._kept_length = (keys, values), 0
        self.keys, self.values = empty if empty is not None else (keys.narrow(-2, 0, 0), values.narrow(-2, 0, 0))

    def extend_pending(self, new: int) -> None:
        """``new`` tokens were written into the kept buffers right after the pending ones (by a batched
        forward, see :meth:`appends_in_place`): they are pending now."""
        total = self.pending_length + new
        self.keys = self._kept[0].narrow(-2, self._kept_length, total)
        self.values = self._kept[1].narrow(-2, self._kept_length, total)

    def rebind_kept(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The shared buffers moved (they grew; their owner copied every token over): point the kept buffers,
        and pending tokens that live in them, at the new ``keys`` and ``values``."""
        in_place = self.pending_length > 0 and self._pending_in_kept()
        self._kept = (keys, values)
        if in_place:
            self.extend_pending(0)

    def detach_kept(self) -> None:
        """Stop using shared kept buffers (their row now holds another cache): pending tokens that live
        there are copied out and the kept floats dropped, so the next read rebuilds them from the codes
        into the layer's own buffers; using this cache later is correct, only slower once."""
        if self._kept is not None and self.kept_slot is not None and self.kept_slot.holds(self._kept[0]):
            if self.pending_length and self._pending_in_kept():
                self.keys, self.values = self.keys.clone(), self.values.clone()
            self._kept, self._kept_length = None, 0
        self.kept_slot = None

    def __deepcopy__(self, memo: dict) -> MixedPrecisionLayer:
        """A deep copy; one whose kept buffers are shared (:attr:`kept_slot`) gets its own copy of its row
        of them rather than a copy of every row's buffer (a view's deep copy copies its whole storage)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        shared = self.kept_slot is not None and self._kept is not None and self.kept_slot.holds(self._kept[0])
        in_place = shared and self.pending_length > 0 and self._pending_in_kept()
        skip = ("kept_slot", "_kept", "keys", "values") if shared else ()
        for name, value in self.__dict__.items():
            if name not in skip:
                setattr(new, name, copy.deepcopy(value, memo))
        if shared:
            new.kept_slot = None
            new._kept = (self._kept[0].clone(), self._kept[1].clone())
            if in_place:
                new.keys = new.values = None
                new.extend_pending(self.pending_length)
            elif not self.pending_length:  # no token, but maybe a view of the shared buffers: not copied whole
                new.keys, new.values = _empty_like_tokens(self.keys), _empty_like_tokens(self.values)
            else:
                new.keys, new.values = copy.deepcopy(self.keys, memo), copy.deepcopy(self.values, memo)
        return new

    def dequantized_nbytes(self) -> int:
        """Bytes of the kept dequantized buffers (0 unless ``keep_dequantized``; spare capacity
        included): memory held beyond the codes."""
        if self._kept is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._kept)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.committed_length + self.pending_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self._segments, self._unmerged = [], []
        self._committed = self._code_nbytes = self._code_fp16_nbytes = 0
        self._gathered = {}
        self._kept, self._kept_length = None, 0
        self.batch_expand = 1
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens; only pending tokens can be taken back."""
        if tokens_to_remove > 0:
            tokens_to_remove = self.get_seq_length() - tokens_to_remove
        n = abs(tokens_to_remove)
        if n == 0 or not self.is_initialized:
            return
        if n > self.pending_length:
            raise ValueError(
                f"cannot crop {n} tokens: only the {self.pending_length} pending tokens are still in full precision"
            )
        keep = self.pending_length - n  # clone: a view would keep the cropped tokens' memory alive
        self.keys = self.keys[..., :keep, :].clone()
        self.values = self.values[..., :keep, :].clone()

    # --- mixed precision ----------------------------------------------------------------------
    @property
    def pending_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def committed_length(self) -> int:
        return self._committed

    def commit(
        self, key_bits: int, value_bits: int | None = None, sink_tokens: int = 0,
        protect: Sequence[bool] | None = None, protect_bits: tuple[int, int] = (16, 16),
    ) -> None:
        """Quantize every pending token of this layer as one block: keys at ``key_bits``, values at
        ``value_bits`` (default: ``key_bits``).

        The first ``sink_tokens`` pending tokens are stored in fp16 as a segment of their own, so the
        rest of the block is quantized (its groups, its min-max ranges) without them; the tokens
        ``protect`` marks (one bool per pending token) are stored at ``protect_bits``, as runs of their own.
        """
        value_bits = key_bits if value_bits is None else value_bits
        if self.pending_length == 0:
            raise ValueError("nothing pending to commit")
        if not 0 <= sink_tokens <= self.pending_length:
            raise ValueError(f"sink_tokens must be in [0, {self.pending_length}], got {sink_tokens}")
        runs = block_runs(self.pending_length, key_bits, value_bits, sink_tokens, protect, protect_bits)
        self._store(_quantize_block(self.keys, self.values, runs, self.group_size, self.symmetric, self.rotations))

    @property
    def rotations(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The matrices this layer's quantized keys and values are stored rotated by (None: not rotated)."""
        if self.keys is None:
            return None, None
        return (
            rotation_matrix(self.keys.shape[-1], self.keys.device) if self.rotate_keys else None,
            rotation_matrix(self.values.shape[-1], self.values.device) if self.rotate_values else None,
        )

    def stacks_with(self, other: MixedPrecisionLayer) -> bool:
        """Whether this layer's pending block can be quantized stacked with ``other``'s into exactly the codes
        each would store alone: the same pending shapes, dtype and device, and the same storage options."""
        if self.keys is None or other.keys is None:
            return False
        return (
            self.keys.shape == other.keys.shape
            and self.values.shape == other.values.shape
            and self.keys.dtype == other.keys.dtype
            and self.keys.device == other.keys.device
            and (self.group_size, self.symmetric, self.rotate_keys, self.rotate_values, self.keep_dequantized)
            == (other.group_size, other.symmetric, other.rotate_keys, other.rotate_values, other.keep_dequantized)
        )

    def _store(
        self, new: list[_Segment], floats: tuple[torch.Tensor, torch.Tensor] | None = None,
        empty: tuple[torch.Tensor, torch.Tensor] | None = None, written: bool = False,
    ) -> None:
        """Append a committed block's segments and empty the pending buffer; ``floats``: the block's
        keys and values already dequantized (a stacked commit did it for every layer at once); ``empty``:
        zero-token (keys, values) to hold as the pending buffer (one pair shared by the layers of a commit);
        ``written``: the dequantized block is already in the kept buffers, right after the kept tokens."""
        self._gathered = {}
        for segment in new:
            self._append(segment)
        if written:
            self._kept_length += sum(segment.length for segment in new)
        elif self.keep_dequantized:
            self._keep_dequantized(new, floats)
        if empty is None:
            empty = (_empty_like_tokens(self.keys), _empty_like_tokens(self.values))
        self.keys, self.values = empty

    @property
    def segments(self) -> list[_Segment]:
        """The committed segments in token order, consecutive blocks at the same bits merged into one when the
        keys' groups line up (merged here, at the first read after a commit; merging moves no code, so the
        bytes are the same either way)."""
        for new in self._unmerged:
            last = self._segments[-1] if self._segments else None
            if (
                last is not None
                and (last.key_bits, last.value_bits) == (new.key_bits, new.value_bits)
                and (last.key_rotation is None) == (new.key_rotation is None)
                and (last.value_rotation is None) == (new.value_rotation is None)
                and last.keys.complete_groups
            ):
                self._segments[-1] = _Segment(
                    new.key_bits,
                    new.value_bits,
                    concat([last.keys, new.keys], dim=-2),
                    concat([last.values, new.values], dim=-2),
                    new.key_rotation,
                    new.value_rotation,
                )
            else:
                self._segments.append(new)
        self._unmerged = []
        return self._segments

    def _append(self, new: _Segment) -> None:
        """Add a committed segment (merged into the last one at the next read of :attr:`segments`; a merge
        moves no code, so the byte counts are added here once)."""
        self._committed += new.length
        self._code_nbytes += new.nbytes()
        self._code_fp16_nbytes += new.keys.fp16_nbytes() + new.values.fp16_nbytes()
        self._unmerged.append(new)

    def nbytes(self, include_pending: bool = True) -> int:
        total = self._code_nbytes
        if include_pending and self.keys is not None:
            total += self.keys.numel() * self.keys.element_size() * 2
        return total

    def fp16_nbytes(self, include_pending: bool = True) -> int:
        total = self._code_fp16_nbytes
        if include_pending and self.keys is not None:
            total += self.keys.numel() * 2 * 2
        return total


class MixedPrecisionKVCache(Cache):
    """A KV cache in which every committed block keeps its own key and value bit-widths (2/3/4/8/16).

    Pass it as the cache of ``model(...)`` or ``model.generate(...)`` of any HF causal LM (``cache=``;
    ``past_key_values=`` before transformers 5.24).
    Without a ``policy`` nothing is ever committed automatically: call :meth:`commit` yourself
    (the environment does, once per step). With a ``policy``, every time ``interval`` or more
    tokens are pending when a new forward starts, ``policy(self)`` picks their bits (an int, or a
    (key_bits, value_bits) pair) and they are committed, so a trained controller can drive real
    decoding. ``sink_tokens``: the first that many tokens of the sequence are stored in fp16 whatever
    their block's bits, outside its quantization groups (they may span several blocks).
    ``keep_dequantized``: also keep the committed prefix dequantized, so forwards copy it rather than
    dequantize it again (faster, same numbers, more resident memory; see the module docstring);
    ``expected_tokens``: with it, the tokens the sequence will reach, so the kept buffers are allocated once.
    ``rotate_keys`` / ``rotate_values``: quantize the keys (values) of every run below 16 bits in a rotated
    basis (each head's keys times an orthonormal Hadamard matrix, :mod:`quant.rotation`) and rotate them back
    when read: the same bits and bytes (issue 15's 2-bit haystack).
    ``reorder_prefix``: hand attention the committed tokens grouped by bit-width instead of in token order
    (then the pending ones, in order), which makes a read of the codes a few ops per width rather than a
    copy per block (see the module docstring). Attention does not depend on the order of the keys it
    sees as long as every query sees all of them, so this is exact only where the mask is the same over
    every committed token: a batch without padding, no sliding window, and nothing that reads the attention
    maps' committed columns by position (single-sequence generation; the env never sets it). Reads of kept
    floats (``keep_dequantized``) stay in token order.
    """

    branch_limit: int | None = None  # branch() broadcasts the prefix to any batch (quant.baselines.EpisodeCache)

    def __init__(
        self,
        num_layers: int | None = None,
        *,
        config=None,
        group_size: int = 64,
        symmetric: bool = False,
        policy: BitsPolicy | None = None,
        interval: int = 64,
        sink_tokens: int = 0,
        keep_dequantized: bool = False,
        rotate_keys: bool = False,
        rotate_values: bool = False,
        expected_tokens: int = 0,
        reorder_prefix: bool = False,
    ):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, numbers.Integral) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an integer >= 0, got {sink_tokens!r}")
        if num_layers is None and config is not None:
            text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
            num_layers = text_config.num_hidden_layers
        self.group_size = group_size
        self.symmetric = symmetric
        self.policy = policy
        self.interval = interval
        self.sink_tokens = int(sink_tokens)
        self.blocks: list[CommittedBlock] = []  # every committed block, in order

        self.keep_dequantized = bool(keep_dequantized)
        self.rotate_keys = bool(rotate_keys)
        self.rotate_values = bool(rotate_values)
        self.reorder_prefix = bool(reorder_prefix)

        def make_layer() -> MixedPrecisionLayer:
            return MixedPrecisionLayer(
                group_size, symmetric, self.keep_dequantized, self.rotate_keys, self.rotate_values,
                int(expected_tokens), self.reorder_prefix,
            )

        if num_layers is not None:
            super().__init__(layers=[make_layer() for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=make_layer)

    # --- transformers Cache contract ----------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0 and self.policy is not None and self.pending_length >= self.interval:
            self.commit(self.policy(self))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reset(self):
        super().reset()
        self.blocks = []

    # --- mixed precision ----------------------------------------------------------------------
    @property
    def pending_length(self) -> int:
        return self.layers[0].pending_length if self.layers else 0

    @property
    def committed_length(self) -> int:
        return sum(block.tokens for block in self.blocks)

    @property
    def block_bits(self) -> list[tuple[int | float, int]]:
        """``(bits, tokens)`` per committed block, in order; ``bits`` is the block's setting.

        For a block with equal key and value bits that is the int width, as it always was; for a
        (key_bits, value_bits) pair it is the block's bits per K/V element, the pair averaged by
        the keys' and values' share of a token's bytes (:meth:`average_bits`), e.g. 3 for K4V2 on
        any model whose keys and values have the same size (an int when whole, else a float).
        Sink tokens are not reflected here: :attr:`blocks` says how many a block holds.
        """
        return [(self._mean_bits(b), b.tokens) for b in self.blocks]

    @property
    def block_key_value_bits(self) -> list[tuple[int, int]]:
        """``(key_bits, value_bits)`` per committed block, in order (the setting chosen for it; for a
        block committed per layer group, the means over groups: ``blocks[i].group_bits`` has each)."""
        return [(b.key_bits, b.value_bits) for b in self.blocks]

    def commit(
        self, bits: BlockBits | None = None, *, key_bits: int | None = None, value_bits: int | None = None,
        protect: Sequence[bool] | None = None, protect_bits: BlockBits = 16,
    ) -> None:
        """Quantize all pending tokens of every layer as one block.

        Either ``bits`` (an int for keys and values alike, or a ``(key_bits, value_bits)`` pair), or
        both ``key_bits`` and ``value_bits``. Pending tokens among the first ``sink_tokens`` of the
        sequence are stored in fp16 instead, outside the block's quantization groups.

        ``protect``: one bool per pending token; the marked tokens (sinks aside) are stored at
        ``protect_bits`` (an int or a pair; default fp16), each run of them quantized on its own, the
        rest of the block around them at ``bits``. Why per token: where one sentence of a long prompt
        carries the answer (a pass key), keeping those few tokens precise keeps the answer at a
        fraction of the bits a whole precise block costs (issue 15). :attr:`blocks` counts them.
        """
        if bits is None and key_bits is None and value_bits is None:
            raise ValueError("commit() needs bits, or key_bits and value_bits")
        if bits is not None and (key_bits is not None or value_bits is not None):
            raise ValueError("commit() takes either bits or key_bits/value_bits, not both")
        if bits is None and (key_bits is None or value_bits is None):
            raise ValueError(
                f"commit() needs both key_bits and value_bits, got {key_bits!r} and {value_bits!r}"
            )
        kb, vb = bit_pair(bits if bits is not None else (key_bits, value_bits))
        pending, sinks = self._check_commit()
        mask = self._protect_mask(protect, sinks)
        pk, pv = bit_pair(protect_bits)
        runs = block_runs(pending, kb, vb, sinks, mask, (pk, pv))
        self._commit_layers(self.layers, runs)
        protected = 0 if mask is None else sum(mask)
        self.blocks.append(CommittedBlock(kb, vb, pending, sinks, (), protected, (pk, pv)))

    @staticmethod
    def commit_rows(caches: Sequence[MixedPrecisionKVCache], bits: BlockBits) -> None:
        """``cache.commit(bits)`` for every one of ``caches``, as one stacked quantization over all their layers
        where their blocks line up (the same pending and sink tokens, layers that stack): the same codes, kept
        floats and :attr:`blocks` as committing each alone.

        Why: the rows of a batched env that choose the same setting in a step commit together, so a commit's
        few dozen small tensor ops (each a kernel launch on a GPU) are paid once per setting, not per row."""
        kb, vb = bit_pair(bits)
        if len({id(cache) for cache in caches}) != len(caches):
            raise ValueError("commit_rows() got the same cache twice")
        for cache in caches:
            if not isinstance(cache, MixedPrecisionKVCache):
                raise TypeError(f"commit_rows() takes MixedPrecisionKVCache caches, got {type(cache).__name__}")
        lined_up: dict[tuple[int, int], list[MixedPrecisionKVCache]] = {}
        for cache in caches:
            lined_up.setdefault(cache._check_commit(), []).append(cache)
        for (pending, sinks), group in lined_up.items():
            MixedPrecisionKVCache._commit_layers(
                [layer for cache in group for layer in cache.layers], block_runs(pending, kb, vb, sinks)
            )
            for cache in group:
                cache.blocks.append(CommittedBlock(kb, vb, pending, sinks))

    @staticmethod
    def _protect_mask(protect: Sequence[bool] | None, sinks: int) -> list[bool] | None:
        """``protect`` as a list of bools, sink tokens cleared (they are fp16 anyway), so :attr:`blocks` counts
        only the tokens actually kept at ``protect_bits``."""
        if protect is None:
            return None
        if isinstance(protect, torch.Tensor):
            protect = protect.tolist()
        return [bool(m) and t >= sinks for t, m in enumerate(protect)]  # its length: block_runs checks it

    def commit_groups(self, settings: Sequence[BlockBits]) -> None:
        """Quantize all pending tokens as one block, with one setting per group of consecutive layers.

        ``settings[g]`` (an int or a ``(key_bits, value_bits)`` pair) applies to the layers of group g
        of :func:`layer_groups` (``len(settings)`` groups, which must divide the layer count). One
        setting is exactly :meth:`commit`. Sink tokens are fp16 in every layer, as with :meth:`commit`.
        """
        if isinstance(settings, (str, bytes)) or not isinstance(settings, Sequence) or not settings:
            raise ValueError(f"commit_groups() needs a non-empty sequence of settings, got {settings!r}")
        pairs = [bit_pair(s) for s in settings]
        groups = layer_groups(len(self.layers), len(pairs))
        if len(pairs) == 1:
            self.commit(pairs[0])
            return
        pending, sinks = self._check_commit()
        for (kb, vb), layers in zip(pairs, groups, strict=True):
            self._commit_layers([self.layers[i] for i in layers], block_runs(pending, kb, vb, sinks))
        mean_k = _whole(sum(k for k, _ in pairs) / len(pairs))
        mean_v = _whole(sum(v for _, v in pairs) / len(pairs))
        self.blocks.append(CommittedBlock(mean_k, mean_v, pending, sinks, tuple(pairs)))

    @staticmethod
    def _commit_layers(layers: Sequence[MixedPrecisionLayer], runs: Sequence[Run]) -> None:
        """Commit the pending block of ``layers`` as ``runs`` (:func:`block_runs`): stacked, as one
        quantization (and one dequantization for ``keep_dequantized``) over every layer's keys and values.

        Why: a block is small, so quantizing it layer by layer was a few dozen tiny tensor ops per
        layer, dominated by per-op overhead. Quantization groups never cross the batch, so slicing the
        stacked result gives each layer exactly the codes its own commit would store. The layers may be
        several caches' (:meth:`commit_rows`). Layers that do not stack (:meth:`MixedPrecisionLayer.stacks_with`)
        commit one by one."""
        first = layers[0]
        if len(layers) == 1 or any(not layer.stacks_with(first) for layer in layers):
            for layer in layers:
                layer._store(
                    _quantize_block(layer.keys, layer.values, runs, layer.group_size, layer.symmetric, layer.rotations)
                )
            return
        n = len(layers)
        stacked = _quantize_block(
            torch.cat([layer.keys for layer in layers]), torch.cat([layer.values for layer in layers]),
            runs, first.group_size, first.symmetric, first.rotations,
        )
        floats: list[tuple[torch.Tensor, torch.Tensor]] | list[None] = [None] * n
        written = False  # the block's floats already sit in every layer's kept buffers (one shared store)
        if first.keep_dequantized:
            with torch.inference_mode():
                keys, values = first._dequantize_segments(stacked, first.keys.dtype)
            written = first.kept_slot is not None and first.kept_slot.write_block(layers, keys, values)
            if not written:
                floats = list(zip(keys.unflatten(0, (n, -1)).unbind(0), values.unflatten(0, (n, -1)).unbind(0),
                                  strict=True))
        # each layer's piece of every segment, cut for all layers at once (unstack: two ops a tensor, not one a layer)
        pieces = [(unstack(s.keys, n), unstack(s.values, n)) for s in stacked]
        empty = (_empty_like_tokens(first.keys), _empty_like_tokens(first.values))  # zero tokens: one pair for all
        for i, layer in enumerate(layers):
            new = [
                _Segment(s.key_bits, s.value_bits, keys[i], values[i], s.key_rotation, s.value_rotation)
                for s, (keys, values) in zip(stacked, pieces, strict=True)
            ]
            layer._store(new, floats[i], empty, written)

    def _check_commit(self) -> tuple[int, int]:
        """``(pending tokens, pending sink tokens)`` of a commit that may go ahead (else an error)."""
        if any(layer.batch_expand > 1 for layer in self.layers):
            raise RuntimeError("cannot commit inside branch(): branched tokens are rolled back on exit")
        pending = self.pending_length
        if pending == 0:
            raise ValueError("commit() with nothing pending: run tokens through the model first")
        return pending, self._pending_sinks()

    def _pending_sinks(self) -> int:
        """How many of the pending tokens are among the sequence's first ``sink_tokens``."""
        return max(0, min(self.sink_tokens - self.committed_length, self.pending_length))

    def _mean_bits(self, block: CommittedBlock) -> int | float:
        """Bits per K/V element of a block's quantized tokens (sinks aside), weighted by element share."""
        if not block.group_bits:
            return self._block_mean_bits(block.key_bits, block.value_bits)
        groups = layer_groups(len(self.layers), len(block.group_bits))
        total = elements = 0
        for (kb, vb), layers in zip(block.group_bits, groups, strict=True):
            for i in layers:
                k, v = self._layer_elements(i)
                total += k * kb + v * vb
                elements += k + v
        return _whole(total / elements) if elements else _whole((block.key_bits + block.value_bits) / 2)

    def _layer_elements(self, index: int) -> tuple[int, int]:
        """Key and value elements one token adds to layer ``index`` (0, 0 before it has seen any)."""
        layer = self.layers[index]
        if layer.keys is None:
            return 0, 0
        return layer.keys.shape[1] * layer.keys.shape[-1], layer.values.shape[1] * layer.values.shape[-1]

    def _key_share(self) -> float:
        """The keys' share of a token's K/V elements (over all layers): 0.5 unless their sizes differ."""
        keys = sum(
            layer.keys.shape[1] * layer.keys.shape[-1] for layer in self.layers if layer.keys is not None
        )
        values = sum(
            layer.values.shape[1] * layer.values.shape[-1]
            for layer in self.layers
            if layer.values is not None
        )
        return keys / (keys + values) if keys + values else 0.5

    def _block_mean_bits(self, key_bits: int, value_bits: int) -> int | float:
        if key_bits == value_bits:
            return key_bits
        share = self._key_share()
        mean = share * key_bits + (1.0 - share) * value_bits
        return int(mean) if mean == int(mean) else mean

    def pending_error(self, bits: BlockBits) -> torch.Tensor:
        """Per pending token: how much committing now at ``bits`` would distort its keys and values.

        ``bits``: an int or a (key_bits, value_bits) pair, as :meth:`commit` takes. For every layer,
        ``||x_t - deq(q(x_t))||^2`` of keys and values together, divided by the block's mean
        ``||x_t||^2``, then averaged over layers; shape ``[pending tokens]``. Nothing is committed.
        Pending sink tokens (see ``sink_tokens``) have no error and are left out of the quantization,
        exactly as :meth:`commit` would; with ``rotate_keys`` (``rotate_values``) keys (values) are quantized
        rotated, as committed (the rotation is orthonormal, so their error is the same in either basis). Why relative to the block mean rather than to the token's own
        norm: an outlier token (an attention sink, a delimiter with massive activations) stretches
        every per-channel key scale of its group, so the damage shows up as error on its
        *neighbours*, which a per-token relative error would hide.
        """
        key_bits, value_bits = bit_pair(bits)
        if self.pending_length == 0:
            raise ValueError("pending_error() with nothing pending: run tokens through the model first")
        sinks = self._pending_sinks()
        total = None
        for layer in self.layers:
            rotations = layer.rotations
            err = torch.zeros(layer.keys.shape[-2], dtype=torch.float32, device=layer.keys.device)
            norm = torch.zeros_like(err)
            for x, axis, b in ((layer.keys, KEY_AXIS, key_bits), (layer.values, VALUE_AXIS, value_bits)):
                xf = x[:1].float()  # batch 1: the pending block of the episode
                norm += xf.square().sum(dim=(0, 1, 3))
                if sinks == xf.shape[-2]:
                    continue
                xq = xf[..., sinks:, :]
                rotation = rotations[0 if axis == KEY_AXIS else 1] if b < 16 else None
                if rotation is not None:  # orthonormal: the error in the stored basis is the error
                    xq = xq @ rotation
                qt = quantize(xq, b, axis, self.group_size, self.symmetric)
                err[sinks:] += (xq - dequantize(qt, torch.float32)).square().sum(dim=(0, 1, 3))
            rel = err / norm.mean().clamp_min(1e-12)
            total = rel if total is None else total.add_(rel)
        return total / len(self.layers)

    def nbytes(self, include_pending: bool = True) -> int:
        """Bytes actually held: packed codes + fp16 scales/zero-points (+ the pending buffer)."""
        return sum(layer.nbytes(include_pending) for layer in self.layers)

    def fp16_nbytes(self, include_pending: bool = True) -> int:
        """Bytes the same tokens would take in an fp16 cache."""
        return sum(layer.fp16_nbytes(include_pending) for layer in self.layers)

    def dequantized_nbytes(self) -> int:
        """Bytes of the dequantized prefix kept with ``keep_dequantized`` (0 without): held on top of
        :meth:`nbytes`, which counts only the stored codes."""
        return sum(layer.dequantized_nbytes() for layer in self.layers)

    def average_bits(self) -> float:
        """Average nominal bits per committed key/value element (nan when nothing is committed).

        Each committed token counts its keys at its block's key bits and its values at the value
        bits, weighted by their share of the token's K/V elements (= of its fp16 bytes) summed over
        layers; sink tokens count 16 for both. Where keys and values have the same size per token
        (kv_heads x head_dim per layer: Llama-style decoders, GQA included) this is the token-weighted
        mean of ``(key_bits + value_bits) / 2``: K4V2 is 3 bits. Scales and zero-points are not counted
        (:meth:`nbytes` has the exact bytes); for uniform blocks and no sinks it is exactly the
        token-weighted mean of the block bits. Protected tokens (``commit(protect=...)``) count their
        ``protect_bits``.
        """
        tokens = self.committed_length
        if not tokens:
            return float("nan")
        total = 0
        for block in self.blocks:
            bits = self._mean_bits(block)
            plain = block.tokens - block.sink_tokens - block.protected_tokens
            total += bits * plain + 16 * block.sink_tokens
            if block.protected_tokens:
                total += self._block_mean_bits(*block.protect_bits) * block.protected_tokens
        return total / tokens

    @contextmanager
    def branch(self, batch_size: int) -> Iterator[MixedPrecisionKVCache]:
        """Score several continuations of one prefix in one batched forward, then forget them.

        Inside the block the committed prefix is broadcast (a view, no copy) along a batch of
        ``batch_size``; on exit every token added inside is dropped and the batch is back to 1, so
        the cache is exactly as it was.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        saved = []
        for layer in self.layers:
            if layer.keys is not None and layer.keys.shape[0] != 1:
                raise ValueError("branch() needs a cache of batch size 1")
            saved.append((layer.keys, layer.values))
            if layer.keys is not None and batch_size > 1:
                layer.keys = layer.keys.expand(batch_size, *layer.keys.shape[1:])
                layer.values = layer.values.expand(batch_size, *layer.values.shape[1:])
            layer.batch_expand = batch_size
        try:
            yield self
        finally:
            for layer, (keys, values) in zip(self.layers, saved, strict=True):
                layer.keys, layer.values = keys, values
                layer.batch_expand = 1
