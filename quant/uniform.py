"""Uniform (min-max) quantization with real bit packing.

A :class:`QuantizedTensor` is what the KV cache stores: packed integer codes plus fp16 scales and
zero-points. Memory is real: 2-bit codes sit four to a byte, 4-bit codes two to a byte and 3-bit codes
in 3/8 of a byte, so :meth:`QuantizedTensor.nbytes` counts what the process actually holds, not a
simulation.

Conventions:

* ``axis`` is the axis along which a group of ``group_size`` elements shares one scale/zero-point
  (KIVI: keys along the token axis, i.e. per channel; values along the head dimension, i.e. per token).
* Codes are always packed along the **last** dimension, so tensors quantized along any other axis
  can still be appended to along the token axis (the cache relies on that).
* 3-bit codes are stored as two bit planes along the last dimension: the low two bits of every code
  packed like 2-bit codes, then the high bit packed eight to a byte (``[ceil(n/4) | ceil(n/8)]``
  bytes). Planes keep unpacking to the fast byte-widening kernels below (8 codes in 3 bytes would
  straddle byte boundaries); the price is that 3-bit tensors cannot be concatenated along the last
  dimension, which the cache never does (it appends along the token axis).
* 16 bits means "kept in fp16": no codes, no scales, just the half-precision tensor.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from quant import fused as _fused

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8, 16)
#: Codes per byte of one packed plane (1 bit: the high-bit plane of 3-bit codes).
_CODES_PER_BYTE = {1: 8, 2: 4, 4: 2, 8: 1}


def check_bits(bits: int) -> int:
    """Validate a bit-width early, so a typo in a config fails before any model runs."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit-width {bits!r}; supported: {SUPPORTED_BITS}")
    return int(bits)


def packed_length(length: int, bits: int) -> int:
    """Bytes that ``length`` codes of ``bits`` occupy along the packed (last) dimension."""
    bits = check_bits(bits)
    if bits == 16:
        raise ValueError("16-bit tensors are stored as fp16 and have no codes to pack")
    if bits == 3:
        return math.ceil(length / 4) + math.ceil(length / 8)
    return math.ceil(length / _CODES_PER_BYTE[bits])


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits) along the last dimension into uint8.

    The last dimension is zero-padded to a multiple of the codes per byte; :func:`unpack_codes`
    needs the original length to drop that padding. 3-bit codes become two planes (module docstring).
    """
    bits = check_bits(bits)
    if bits == 16:
        raise ValueError("16-bit tensors are stored as fp16 and have no codes to pack")
    if bits == 3:
        codes = codes.to(torch.uint8)
        return torch.cat([_pack_plane(codes & 3, 2), _pack_plane(codes >> 2, 1)], dim=-1)
    return _pack_plane(codes, bits)


def _pack_plane(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = _CODES_PER_BYTE[bits]
    if per_byte == 1:  # a copy, so that the stored codes never alias the caller's tensor
        return codes.to(torch.uint8, memory_format=torch.contiguous_format, copy=True)
    codes = codes.to(torch.uint8)
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = grouped[..., 0].clone(memory_format=torch.contiguous_format)  # unpack needs contiguous
    for i in range(1, per_byte):
        packed |= grouped[..., i] << (bits * i)
    return packed


#: One packed byte widened to one byte per code.
_WIDE_DTYPE = {1: torch.int64, 2: torch.int32, 4: torch.int16}


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes of the given last-dimension ``length``.

    Why not ``(packed.unsqueeze(-1) >> shifts) & mask``: that broadcasts over an inner dimension of
    2 or 4 elements, which PyTorch's CPU kernels do not vectorise; it was the largest cost of a
    decode step. Instead each byte is widened to an integer of as many bytes as it holds codes and
    every code is moved into its own byte, so that viewing the result as uint8 (little-endian) lays
    the codes out in order. Only contiguous elementwise kernels run: ~15x faster at 4 bits.
    """
    bits = check_bits(bits)
    if bits == 16:
        raise ValueError("16-bit tensors are stored as fp16 and have no codes to unpack")
    if bits == 3:
        split = math.ceil(length / 4)
        low = _unpack_plane(packed[..., :split], 2, length)
        return low.bitwise_or_(_unpack_plane(packed[..., split:], 1, length) << 2)
    return _unpack_plane(packed, bits, length)


def _unpack_plane(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    per_byte = _CODES_PER_BYTE[bits]
    if per_byte == 1:
        return packed[..., :length]
    mask = (1 << bits) - 1
    if sys.byteorder != "little":  # portable fallback; the byte view below assumes little-endian
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :length]
    wide = packed.to(_WIDE_DTYPE[bits], memory_format=torch.contiguous_format)
    for i in range(1, per_byte):
        # Moving code i from bit bits*i to bit 8*i (byte i) is adding (2**((8-bits)*i) - 1) times it:
        # one fused in-place add per code; higher codes are untouched, so later masks still read them.
        wide.add_(wide & (mask << (bits * i)), alpha=(1 << ((8 - bits) * i)) - 1)
    return wide.view(torch.uint8)[..., :length]


def _round_half(x: torch.Tensor, direction: float) -> torch.Tensor:
    """Round float32 to fp16 towards ``direction`` (-inf or +inf).

    Rounding the zero-point down and the scale up guarantees every input lies inside the
    representable range after the fp16 round trip, so the error bound of half a step holds exactly.
    """
    h = x.to(torch.float16)
    wrong_side = (h.float() > x) if direction < 0 else (h.float() < x)
    # One fp16 step is at most 2**-10 relative (6e-8 absolute for subnormals): stepping that far before
    # rounding to nearest lands on the requested side. Computed whether or not any element needs it: asking
    # first (``wrong_side.any()``) would make a GPU wait for the answer on every commit, and some element of
    # a block nearly always does.
    nudged = (x + direction * (x.abs() * 2.0**-10 + 6e-8)).to(torch.float16)
    return torch.where(wrong_side, nudged, h)


@dataclass
class QuantizedTensor:
    """Packed codes + fp16 scale/zero of one tensor, or the fp16 tensor itself at 16 bits.

    ``scale`` and ``zero`` have the tensor's shape with ``axis`` reduced to ``ceil(n / group_size)``
    groups, so two tensors quantized with complete groups can be concatenated along any dimension.
    """

    data: torch.Tensor  # packed uint8 codes, or the fp16 tensor when bits == 16
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    bits: int
    shape: tuple[int, ...]
    axis: int
    group_size: int
    symmetric: bool = False

    def nbytes(self) -> int:
        """Bytes held in memory: codes plus scales plus zero-points."""
        total = self.data.numel() * self.data.element_size()
        for t in (self.scale, self.zero):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def fp16_nbytes(self) -> int:
        """Bytes the same tensor would take in fp16: the baseline memory ratios are against."""
        return 2 * math.prod(self.shape)

    @property
    def complete_groups(self) -> bool:
        return self.bits == 16 or self.shape[self.axis] % self.group_size == 0

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize(self, dtype, out)


def _normalise_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-d tensor")
    return axis % ndim


def quantize(
    x: torch.Tensor, bits: int, axis: int = -1, group_size: int = 64, symmetric: bool = False
) -> QuantizedTensor:
    """Quantize ``x`` to ``bits`` with one scale/zero per ``group_size`` elements along ``axis``.

    Asymmetric (default) is min-max with a zero-point, as KIVI; symmetric uses ``max|x|`` and a
    fixed mid-point, which wastes one level but needs no zero-point.
    """
    bits = check_bits(bits)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if x.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    axis = _normalise_axis(axis, x.dim())
    shape = tuple(x.shape)
    if bits == 16:
        return QuantizedTensor(x.to(torch.float16), None, None, 16, shape, axis, group_size, symmetric)

    n = shape[axis]
    groups = math.ceil(n / group_size)
    xf = x.float().movedim(axis, -1)
    pad = groups * group_size - n
    if pad:  # replicate the last element: it changes neither min nor max of the partial group
        xf = torch.cat([xf, xf[..., -1:].expand(*xf.shape[:-1], pad)], dim=-1)
    grouped = xf.reshape(*xf.shape[:-1], groups, group_size)
    levels = (1 << bits) - 1
    if symmetric:
        half = (1 << (bits - 1)) - 1
        absmax = grouped.abs().amax(dim=-1, keepdim=True)
        scale = _round_half(torch.clamp(absmax / half, min=1e-8), +1.0)
        zero = None
        codes = torch.round(grouped / scale.float()) + half
    else:
        lo = _round_half(grouped.amin(dim=-1, keepdim=True), -1.0)
        hi = grouped.amax(dim=-1, keepdim=True)
        scale = _round_half(torch.clamp((hi - lo.float()) / levels, min=1e-8), +1.0)
        zero = lo
        codes = torch.round((grouped - lo.float()) / scale.float())
    codes = codes.clamp_(0, levels).to(torch.uint8)
    codes = codes.reshape(*xf.shape[:-1], groups * group_size)[..., :n].movedim(-1, axis)
    scale = scale.squeeze(-1).movedim(-1, axis).contiguous()
    zero = zero.squeeze(-1).movedim(-1, axis).contiguous() if zero is not None else None
    return QuantizedTensor(pack_codes(codes, bits), scale, zero, bits, shape, axis, group_size, symmetric)


def _grouped(t: torch.Tensor, axis: int, groups: int, group_size: int) -> torch.Tensor:
    """View ``axis`` of ``t`` as ``(groups, group_size)`` so per-group parameters broadcast for free."""
    return t.unflatten(axis, (groups, group_size))


def _affine_(out: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, axis: int, group_size: int) -> None:
    """``out = zero + out * scale`` in place, with one (zero, scale) per group along ``axis``.

    ``axis`` is non-negative. Complete groups are one call on a reshaped view, a trailing partial
    group a second call with the last group's parameters: parameters are never repeated per element
    (``repeat_interleave`` would allocate a full-size temporary on every decode step). Parameters
    with batch 1 broadcast over a larger ``out`` batch (the cache's ``branch()``).
    """
    g = group_size
    params_shape = (*out.shape[:axis], zero.shape[axis], *out.shape[axis + 1 :])
    zero, scale = zero.expand(params_shape), scale.expand(params_shape)
    n = out.shape[axis]
    full = n // g
    parts = []
    if full:
        body = _grouped(out.narrow(axis, 0, full * g), axis, full, g)
        z = _grouped(zero.narrow(axis, 0, full), axis, full, 1)
        parts.append((body, z, _grouped(scale.narrow(axis, 0, full), axis, full, 1)))
    if n > full * g:
        tail = out.narrow(axis, full * g, n - full * g)
        parts.append((tail, zero.narrow(axis, full, 1), scale.narrow(axis, full, 1)))
    for target, z, s in parts:
        if axis == out.dim() - 1:
            # Parameters broadcast along the innermost dimension: the fused ternary kernel does not
            # vectorise that (5x slower than these two binary ops, which do).
            target.mul_(s).add_(z)
        else:
            torch.addcmul(z, target, s, out=target)


def _params(qt: QuantizedTensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero, scale) in ``dtype``; a 16-bit tensor gets (0, 1), so it can share one affine pass."""
    if qt.bits == 16:
        groups = math.ceil(qt.shape[qt.axis] / qt.group_size)
        shape = (*qt.shape[: qt.axis], groups, *qt.shape[qt.axis + 1 :])
        return qt.data.new_zeros(shape, dtype=dtype), qt.data.new_ones(shape, dtype=dtype)
    scale = qt.scale.to(dtype)
    if qt.symmetric:  # (c - half) * s computed as -half*s + c*s: one fused op serves both modes
        return scale * -float((1 << (qt.bits - 1)) - 1), scale
    return qt.zero.to(dtype), scale


def _fp16_param(qt: QuantizedTensor, name: str) -> torch.Tensor:
    """The stored fp16 zero-point or scale; for a 16-bit tensor a broadcast 0 or 1 (no allocation)."""
    if qt.bits != 16:
        return getattr(qt, name)
    groups = math.ceil(qt.shape[qt.axis] / qt.group_size)
    shape = (*qt.shape[: qt.axis], groups, *qt.shape[qt.axis + 1 :])
    return _fp16_constant(0.0 if name == "zero" else 1.0, qt.data.device).expand(shape)


@functools.lru_cache(maxsize=16)
def _fp16_constant(value: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float16, device=device)


def _check_out(out: torch.Tensor, shape: tuple[int, ...]) -> None:
    if out.dim() != len(shape) or any(o != s and s != 1 for o, s in zip(out.shape, shape, strict=True)):
        raise ValueError(f"out of shape {tuple(out.shape)} cannot receive a dequantized {shape} tensor")


def dequantize(
    qt: QuantizedTensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None, fused: bool = True
) -> torch.Tensor:
    """Reconstruct the tensor; what attention sees for a committed block.

    ``out`` (any strides, e.g. a slice of a larger buffer, and possibly with a larger batch that
    ``qt`` broadcasts to; its dtype wins over ``dtype``) receives the result without an intermediate
    copy: the cache dequantizes every segment straight into the tensor it hands to attention.
    ``fused``: on the CPU in float32, one pass of :mod:`quant.fused`'s kernel where it is available
    (the same numbers); False: the torch ops below.
    """
    if out is None:
        out = torch.empty(qt.shape, dtype=dtype, device=qt.data.device)
    _check_out(out, qt.shape)
    if qt.bits == 16:
        return out.copy_(qt.data)
    if fused and _fused.dequantize_into(qt, out):
        return out
    # Codes -> floats straight into ``out``, then one in-place fused multiply-add. (``addcmul`` on the
    # uint8 codes themselves goes through a slow mixed-dtype path and a hidden full-size temporary.)
    out.copy_(unpack_codes(qt.data, qt.bits, qt.shape[-1]))
    zero, scale = _params(qt, out.dtype)
    _affine_(out, zero, scale, qt.axis, qt.group_size)
    return out


def narrow(qt: QuantizedTensor, dim: int, start: int, length: int) -> QuantizedTensor:
    """Elements ``[start, start + length)`` of ``qt`` along ``dim``, as views of its codes and parameters.

    Along the quantized axis ``start`` must begin a group; along the packed (last) dimension only a
    16-bit tensor can be sliced (codes share bytes there)."""
    ndim = len(qt.shape)
    dim = _normalise_axis(dim, ndim)
    if not (0 <= start and length >= 0 and start + length <= qt.shape[dim]):
        raise ValueError(f"[{start}, {start + length}) is outside the {qt.shape[dim]} elements along dim {dim}")
    if dim == ndim - 1 and qt.bits != 16:
        raise ValueError("codes are packed along the last dimension: a quantized tensor cannot be sliced along it")
    params = [qt.scale, qt.zero]
    if qt.bits != 16:
        if dim == qt.axis:
            if start % qt.group_size:
                raise ValueError(f"start {start} does not begin a group of {qt.group_size} along the quantized axis")
            first, stop = start // qt.group_size, math.ceil((start + length) / qt.group_size)
            params = [None if t is None else t.narrow(dim, first, stop - first) for t in params]
        else:
            params = [None if t is None else t.narrow(dim, start, length) for t in params]
    shape = list(qt.shape)
    shape[dim] = length
    return QuantizedTensor(
        qt.data.narrow(dim, start, length), params[0], params[1], qt.bits, tuple(shape), qt.axis, qt.group_size,
        qt.symmetric,
    )


def unstack(qt: QuantizedTensor, parts: int) -> list[QuantizedTensor]:
    """``qt`` cut into ``parts`` equal pieces along dim 0, as views of its codes and parameters.

    The same pieces as ``narrow(qt, 0, i * n, n)`` for each i, in two tensor ops per tensor for all of them
    rather than one per piece: a commit quantizes every layer's block stacked along dim 0 and hands each
    layer its piece (on a GPU every op is a kernel launch, and there are 30 layers)."""
    n = qt.shape[0]
    if parts < 1 or n % parts:
        raise ValueError(f"cannot cut {n} elements along dim 0 into {parts} equal pieces")
    if qt.axis % len(qt.shape) == 0 and qt.bits != 16:
        raise ValueError("dim 0 is this tensor's quantized axis: cut it with narrow, group by group")

    def cut(t: torch.Tensor | None) -> Sequence[torch.Tensor | None]:
        return [None] * parts if t is None else t.unflatten(0, (parts, -1)).unbind(0)

    shape = (n // parts, *qt.shape[1:])
    return [
        QuantizedTensor(data, scale, zero, qt.bits, shape, qt.axis, qt.group_size, qt.symmetric)
        for data, scale, zero in zip(cut(qt.data), cut(qt.scale), cut(qt.zero), strict=True)
    ]


@dataclass(frozen=True)
class Gathered:
    """The parts of one concatenation, regrouped to be read many times (:func:`gather`).

    ``chunks``: parts of equal bits joined into one tensor, each with the ``(start, length)`` ranges its
    parts take along ``dim``, in order (neighbouring parts in one range). ``parts``: the original parts in order, as views into the chunks,
    so whoever stores the parts can keep these instead and hold every code once. ``aligned``: the groups
    of every part but the last are complete along the quantized axis (or ``dim`` is not that axis), so
    one multiply-add can run over the whole concatenation."""

    chunks: tuple[tuple[QuantizedTensor, tuple[tuple[int, int], ...]], ...]
    parts: tuple[QuantizedTensor, ...]
    dim: int
    shape: tuple[int, ...]
    aligned: bool


def gather(parts: list[QuantizedTensor], dim: int = -2, labels: Sequence[Hashable] | None = None) -> Gathered:
    """Join the parts of equal bits of the concatenation of ``parts`` along ``dim`` (their bits may differ).

    Parts join while the groups line up: along the quantized axis each part but the last of a chunk
    must end on a complete group; along the packed (last) dimension nothing joins. ``labels`` (one per
    part): parts join only with parts of the same label as well, so two concatenations gathered with the
    same labels (a cache's keys and values) can be chunked alike. Why: a cache of
    blocks at alternating bits never merges them into one segment, and re-joining their codes on
    every read (or dequantizing them part by part, where the groups do not line up) was most of the
    cost of reading it (:func:`dequantize_gathered`)."""
    if not parts:
        raise ValueError("nothing to dequantize")
    first = parts[0]
    ndim = len(first.shape)
    dim = _normalise_axis(dim, ndim)
    if any((p.axis, p.group_size, p.symmetric) != (first.axis, first.group_size, first.symmetric) for p in parts):
        raise ValueError("parts must share axis, group size and mode")
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + p.shape[dim])
    runs: list[list[int]] = []  # indices of the parts of each chunk
    open_run: dict[tuple, list[int]] = {}  # (bits, label) -> the chunk the parts of those still join
    if labels is not None and len(labels) != len(parts):
        raise ValueError(f"labels needs one label per part ({len(parts)}), got {len(labels)}")
    for i, p in enumerate(parts):
        key = (p.bits, None if labels is None else labels[i])
        run = open_run.get(key)
        if run is None or dim == ndim - 1:
            run = []
            runs.append(run)
        run.append(i)
        open_run[key] = run if dim != first.axis or p.complete_groups else None
    chunks, views = [], list(parts)
    for run in runs:
        joined = concat([parts[i] for i in run], dim) if len(run) > 1 else parts[run[0]]
        ranges: list[tuple[int, int]] = []
        for i in run:  # neighbouring parts make one range
            if ranges and sum(ranges[-1]) == starts[i]:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + parts[i].shape[dim])
            else:
                ranges.append((starts[i], parts[i].shape[dim]))
        chunks.append((joined, tuple(ranges)))
        if len(run) > 1:
            offset = 0
            for i in run:
                views[i] = narrow(joined, dim, offset, parts[i].shape[dim])
                offset += parts[i].shape[dim]
    shape = list(first.shape)
    shape[dim] = starts[-1]
    # 16-bit parts have no groups but take the place of theirs in the concatenated parameters
    aligned = dim != ndim - 1 and (dim != first.axis or all(p.shape[dim] % p.group_size == 0 for p in parts[:-1]))
    return Gathered(tuple(chunks), tuple(views), dim, tuple(shape), aligned)


def dequantize_gathered(gathered: Gathered, out: torch.Tensor) -> torch.Tensor:
    """Dequantize the concatenation ``gathered`` stands for into ``out`` (which may have a larger batch that
    the parts broadcast to); the same arithmetic per element as dequantizing part by part.

    Aligned: each chunk's codes are unpacked once and copied into their places, then one multiply-add
    runs over everything with the parts' parameters concatenated (a 16-bit part gets 0 and 1): the
    fewest ops per read. Otherwise each chunk is dequantized whole and its parts copied into place."""
    _check_out(out, gathered.shape)
    dim = gathered.dim
    # the fused kernel (quant.fused) writes each chunk straight into its places, even one split into several ranges
    fused = tuple(out.shape) == gathered.shape and _fused.usable(out)
    if fused or len(gathered.chunks) == 1 or not gathered.aligned:
        for qt, ranges in gathered.chunks:
            if len(ranges) == 1:
                dequantize(qt, out=out.narrow(dim, ranges[0][0], qt.shape[dim]))
            elif not (fused and dim == 2 and _fused.dequantize_into(qt, out, _token_rows(ranges))):
                _scatter(dequantize(qt, out.dtype), ranges, out, dim)
        return out
    for qt, ranges in gathered.chunks:
        _scatter(qt.data if qt.bits == 16 else unpack_codes(qt.data, qt.bits, qt.shape[-1]), ranges, out, dim)
    parts = gathered.parts
    if parts[0].symmetric:  # zero-points depend on the bits: per part
        params = [_params(p, out.dtype) for p in parts]
        zero, scale = torch.cat([z for z, _ in params], dim), torch.cat([s for _, s in params], dim)
    else:  # concatenate the fp16 parameters first, convert once: 2 ops instead of 2 per part
        zero = torch.cat([_fp16_param(p, "zero") for p in parts], dim).to(out.dtype)
        scale = torch.cat([_fp16_param(p, "scale") for p in parts], dim).to(out.dtype)
    _affine_(out, zero, scale, parts[0].axis, parts[0].group_size)
    return out


@functools.lru_cache(maxsize=4096)
def _token_rows(ranges: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The destination of each element of a chunk whose parts take the ``(start, length)`` ``ranges``: the
    fused kernel's ``rows`` (kept per ranges, which stay the same from one decode step to the next)."""
    return torch.cat([torch.arange(start, start + n) for start, n in ranges])


def _scatter(values: torch.Tensor, ranges: tuple[tuple[int, int], ...], out: torch.Tensor, dim: int) -> None:
    """Copy consecutive slices of ``values`` along ``dim`` to the ``(start, length)`` ranges of ``out``."""
    offset = 0
    for start, n in ranges:
        out.narrow(dim, start, n).copy_(values.narrow(dim, offset, n))
        offset += n


def dequantize_cat(parts: list[QuantizedTensor], out: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Dequantize the concatenation along ``dim`` of parts whose bits may differ, into ``out``.

    Read once, as here, it gathers the parts first; a reader that comes back every step (the cache)
    keeps the :func:`gather` result and calls :func:`dequantize_gathered`."""
    return dequantize_gathered(gather(parts, dim), out)


def concat(parts: list[QuantizedTensor], dim: int) -> QuantizedTensor:
    """Concatenate quantized tensors of equal bits along ``dim`` without re-quantizing.

    Along the quantized axis this needs every part but the last to end on a complete group, so
    that the groups of the result are exactly the groups of the parts.
    """
    if not parts:
        raise ValueError("nothing to concatenate")
    first = parts[0]
    dim = _normalise_axis(dim, len(first.shape))
    for p in parts[1:]:
        if (p.bits, p.axis, p.group_size, p.symmetric) != (
            first.bits,
            first.axis,
            first.group_size,
            first.symmetric,
        ):
            raise ValueError(
                "can only concatenate quantized tensors with the same bits, axis, group and mode"
            )
    if dim == first.axis and not all(p.complete_groups for p in parts[:-1]):
        raise ValueError("parts before the last must end on a complete group along the quantized axis")
    if dim == len(first.shape) - 1 and first.bits == 3:
        raise ValueError("3-bit codes are stored in two bit planes along the last dimension: "
                         "they cannot be concatenated along it")
    if dim == len(first.shape) - 1 and first.bits != 16:
        per_byte = _CODES_PER_BYTE[first.bits]
        if any(p.shape[-1] % per_byte for p in parts[:-1]):
            raise ValueError("parts must fill whole bytes along the packed (last) dimension")
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    data = torch.cat([p.data for p in parts], dim=dim)
    scale = torch.cat([p.scale for p in parts], dim=dim) if first.scale is not None else None
    zero = torch.cat([p.zero for p in parts], dim=dim) if first.zero is not None else None
    return QuantizedTensor(
        data, scale, zero, first.bits, tuple(shape), first.axis, first.group_size, first.symmetric
    )


def expected_nbytes(
    shape: tuple[int, ...], bits: int, axis: int, group_size: int, symmetric: bool = False
) -> int:
    """The storage formula (codes + fp16 scale/zero overhead), for checking :meth:`nbytes`."""
    check_bits(bits)
    numel = math.prod(shape)
    if bits == 16:
        return 2 * numel
    code_bytes = numel // shape[-1] * packed_length(shape[-1], bits)
    groups = numel // shape[axis] * math.ceil(shape[axis] / group_size)
    return code_bytes + groups * 2 * (1 if symmetric else 2)
