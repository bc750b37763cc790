"""Uniform (min-max) quantization with real bit packing.

A :class:`QuantizedTensor` is what the KV cache stores: packed integer codes plus fp16 scales and
zero-points. Memory is real: 2-bit codes sit four to a byte and 4-bit codes two to a byte, so
:meth:`QuantizedTensor.nbytes` counts what the process actually holds, not a simulation.

Conventions:

* ``axis`` is the axis along which a group of ``group_size`` elements shares one scale/zero-point
  (KIVI: keys along the token axis, i.e. per channel; values along the head dimension, i.e. per token).
* Codes are always packed along the **last** dimension, so tensors quantized along any other axis
  can still be appended to along the token axis (the cache relies on that).
* 3-bit codes are stored one per byte: packing 8 codes into 3 bytes is possible but would make
  appending along the last dimension awkward, and 3 bits is not in the environment's default set.
* 16 bits means "kept in fp16": no codes, no scales, just the half-precision tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8, 16)
_CODES_PER_BYTE = {2: 4, 3: 1, 4: 2, 8: 1}


def check_bits(bits: int) -> int:
    """Validate a bit-width early, so a typo in a config fails before any model runs."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit-width {bits!r}; supported: {SUPPORTED_BITS}")
    return int(bits)


def codes_per_byte(bits: int) -> int:
    return _CODES_PER_BYTE[check_bits(bits)] if bits != 16 else 0


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits) along the last dimension into uint8.

    The last dimension is zero-padded to a multiple of the codes per byte; :func:`unpack_codes`
    needs the original length to drop that padding.
    """
    per_byte = codes_per_byte(bits)
    if per_byte == 0:
        raise ValueError("16-bit tensors are stored as fp16 and have no codes to pack")
    codes = codes.to(torch.uint8)
    if per_byte == 1:
        return codes.contiguous()
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = grouped[..., 0].clone()
    for i in range(1, per_byte):
        packed |= grouped[..., i] << (bits * i)
    return packed


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes of the given last-dimension ``length``."""
    per_byte = codes_per_byte(bits)
    if per_byte == 1:
        return packed[..., :length]
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> _shifts(bits, packed.device)) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :length]


def _round_half(x: torch.Tensor, direction: float) -> torch.Tensor:
    """Round float32 to fp16 towards ``direction`` (-inf or +inf).

    Rounding the zero-point down and the scale up guarantees every input lies inside the
    representable range after the fp16 round trip, so the error bound of half a step holds exactly.
    """
    h = x.to(torch.float16)
    wrong_side = (h.float() > x) if direction < 0 else (h.float() < x)
    if wrong_side.any():
        # One fp16 step is at most 2**-10 relative (6e-8 absolute for subnormals): stepping that far
        # before rounding to nearest lands on the requested side.
        nudged = (x + direction * (x.abs() * 2.0**-10 + 6e-8)).to(torch.float16)
        h = torch.where(wrong_side, nudged, h)
    return h


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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


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


def _expand_groups(t: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """Broadcast per-group parameters back to one value per element along the quantized axis."""
    n = qt.shape[qt.axis]
    if qt.group_size == 1:
        return t
    return t.repeat_interleave(qt.group_size, dim=qt.axis).narrow(qt.axis, 0, n)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the tensor; what attention sees for a committed block."""
    if qt.bits == 16:
        return qt.data.to(dtype)
    codes = unpack_codes(qt.data, qt.bits, qt.shape[-1]).to(dtype)
    n, g = qt.shape[qt.axis], qt.group_size
    if n % g == 0:
        # Fast path: view the axis as (groups, group) and broadcast, no per-element copy of scales.
        view = (*qt.shape[: qt.axis], n // g, g, *qt.shape[qt.axis + 1 :])
        codes = codes.reshape(view)
        scale = qt.scale.to(dtype).unsqueeze(qt.axis + 1)
        if qt.symmetric:
            half = (1 << (qt.bits - 1)) - 1
            return ((codes - half) * scale).reshape(qt.shape)
        return torch.addcmul(qt.zero.to(dtype).unsqueeze(qt.axis + 1), codes, scale).reshape(qt.shape)
    scale = _expand_groups(qt.scale.to(dtype), qt)
    if qt.symmetric:
        half = (1 << (qt.bits - 1)) - 1
        return (codes - half) * scale
    return torch.addcmul(_expand_groups(qt.zero.to(dtype), qt), codes, scale)


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
        if (p.bits, p.axis, p.group_size, p.symmetric) != (first.bits, first.axis, first.group_size, first.symmetric):
            raise ValueError("can only concatenate quantized tensors with the same bits, axis, group and mode")
    if dim == first.axis and not all(p.complete_groups for p in parts[:-1]):
        raise ValueError("parts before the last must end on a complete group along the quantized axis")
    if dim == len(first.shape) - 1 and first.bits != 16:
        per_byte = codes_per_byte(first.bits)
        if any(p.shape[-1] % per_byte for p in parts[:-1]):
            raise ValueError("parts must fill whole bytes along the packed (last) dimension")
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    data = torch.cat([p.data for p in parts], dim=dim)
    scale = torch.cat([p.scale for p in parts], dim=dim) if first.scale is not None else None
    zero = torch.cat([p.zero for p in parts], dim=dim) if first.zero is not None else None
    return QuantizedTensor(data, scale, zero, first.bits, tuple(shape), first.axis, first.group_size, first.symmetric)


def expected_nbytes(shape: tuple[int, ...], bits: int, axis: int, group_size: int, symmetric: bool = False) -> int:
    """The storage formula (codes + fp16 scale/zero overhead), for checking :meth:`nbytes`."""
    check_bits(bits)
    numel = math.prod(shape)
    if bits == 16:
        return 2 * numel
    per_byte = codes_per_byte(bits)
    code_bytes = numel // shape[-1] * math.ceil(shape[-1] / per_byte)
    groups = numel // shape[axis] * math.ceil(shape[axis] / group_size)
    return code_bytes + groups * 2 * (1 if symmetric else 2)
