"""Weight quantization, selectable by name, so an experiment can combine it with KV quantization.

Two families live here:

* ``int8-pertensor``: the seeds' method. One symmetric scale per weight matrix, weights stored as
  real ``int8`` (a buffer, so ``state_dict`` and memory both shrink), activations quantized per
  forward with one dynamic scale. The matmul runs in float on the integer-valued tensors: CPUs have
  no portable int8 GEMM in PyTorch, and the point of this method is the *numerics* of INT8, not speed.
* ``int8`` / ``int4``: optimum-quanto's weight-only quantization (per output channel; int4 also
  group-wise where quanto finds a group size that divides the input features). This is the library
  reference the hand-written method is compared with.

``lm_head`` is never quantized: in SmolLM it is tied to the input embeddings, so quantizing it would
either untie it (more memory, not less) or quantize the embedding table through the back door.

:func:`weight_nbytes` counts what the model really holds, including quanto's packed storage, so the
memory column of a comparison is measured rather than computed from bit-widths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from quant.registry import Registry

__all__ = [
    "WEIGHT_QUANTIZERS",
    "QuantLinear",
    "dequantize_int8_per_tensor",
    "quantize_int8_per_tensor",
    "quantize_model_weights",
    "register_weight_quantizer",
    "tensor_nbytes",
    "weight_nbytes",
]

_INT8_MAX = 127  # symmetric: -127..127, so negating a code never overflows


# --------------------------------------------------------------------------------------------------
# Per-tensor symmetric INT8
# --------------------------------------------------------------------------------------------------
def quantize_int8_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor INT8: ``q = round(x / scale)``, ``scale = max|x| / 127``.

    Returns ``(q, scale)`` with ``q`` int8 of ``x``'s shape and ``scale`` a 0-d float32 tensor.
    Because no value is clipped, the round-trip error is at most ``scale / 2`` per element.
    An all-zero tensor gets scale 1 (any scale reproduces it exactly; 1 avoids dividing by zero).
    """
    if not torch.is_floating_point(x):
        raise ValueError(f"quantize_int8_per_tensor expects a floating-point tensor, got {x.dtype}")
    xf = x.detach().float()
    amax = xf.abs().amax() if xf.numel() else torch.zeros((), device=xf.device)
    scale = torch.where(amax > 0, amax / _INT8_MAX, torch.ones_like(amax))
    q = torch.clamp(torch.round(xf / scale), -_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8_per_tensor(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_int8_per_tensor` (up to the rounding error), in ``dtype``."""
    if q.dtype != torch.int8:
        raise ValueError(f"dequantize_int8_per_tensor expects int8 codes, got {q.dtype}")
    return (q.float() * scale.float()).to(dtype)


class QuantLinear(nn.Module):
    """``nn.Linear`` with INT8 per-tensor weights (quantized once) and INT8 dynamic activations.

    Weights are held as an ``int8`` buffer plus one float32 scale; the float weight is not kept, so
    the memory saving is real. Each forward quantizes the input with its own per-tensor scale, then
    computes ``(x_q @ w_q.T) * (s_x * s_w) + bias`` in the input's float dtype. The bias stays in
    float: it is tiny and quantizing it buys nothing.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight_q", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        """Quantize an existing ``nn.Linear`` (its weights are read once, never referenced again)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"QuantLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=w.device,
            bias_dtype=w.dtype,
        )
        q, scale = quantize_int8_per_tensor(w)
        module.weight_q.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized float32 weight, for code that inspects ``.weight``; a fresh copy on each access."""
        return dequantize_int8_per_tensor(self.weight_q, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if torch.is_floating_point(x) else torch.float32
        x_q, x_scale = quantize_int8_per_tensor(x)
        # Integer-valued float matmul, then one rescale: the same numbers as an int8 GEMM with an
        # int32 accumulator, up to float rounding of the accumulated sum.
        out = F.linear(x_q.to(dtype), self.weight_q.to(dtype))
        out = out * (x_scale * self.weight_scale).to(dtype)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out

    def nbytes(self) -> int:
        """Bytes this layer stores: int8 codes + the scale + the float bias (if any)."""
        return sum(tensor_nbytes(t) for t in (self.weight_q, self.weight_scale, self.bias) if t is not None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, weights=int8-pertensor"


# --------------------------------------------------------------------------------------------------
# Byte counting
# --------------------------------------------------------------------------------------------------
def tensor_nbytes(t: torch.Tensor | None) -> int:
    """Bytes a tensor really holds, looking through tensor subclasses.

    optimum-quanto's quantized tensors (``WeightQBytesTensor``, ``WeightQBitsTensor``,
    ``PackedTensor``, TinyGemm/Marlin variants, ...) are wrapper subclasses whose ``numel() *
    element_size()`` reports the *logical* (dequantized) size. Their real storage is listed by
    ``__tensor_flatten__`` (e.g. ``_data`` packed uint8 codes, ``_scale``, ``_shift``), so we recurse
    into those until we reach plain tensors. ``None`` counts as 0.
    """
    if t is None:
        return 0
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        inner_names, _meta = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, name)) for name in inner_names)
    return t.numel() * t.element_size()


def _distinct(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Drop repeats by identity, so tied weights (SmolLM's lm_head/embeddings) count once."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def weight_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each distinct tensor counted once.

    Counts: every parameter and buffer (persistent or not, e.g. rotary ``inv_freq``), through
    quantized subclasses as :func:`tensor_nbytes` describes, so an int4 quanto weight counts half a
    byte per element plus its scales and shifts, and a :class:`QuantLinear` one byte per element plus
    its scale and bias. Tied tensors count once. Not counted: activations, the KV cache, and Python/
    allocator overhead.
    """
    tensors = _distinct(list(model.parameters()) + list(model.buffers()))
    return sum(tensor_nbytes(t) for t in tensors)


# --------------------------------------------------------------------------------------------------
# Model-level quantizers (registry)
# --------------------------------------------------------------------------------------------------
WeightQuantizer = Callable[[nn.Module], nn.Module]
WEIGHT_QUANTIZERS: Registry[WeightQuantizer] = Registry("weight quantization method")
#: Register a whole-model weight quantizer under a name (duplicate names are an error).
register_weight_quantizer = WEIGHT_QUANTIZERS.register


def _excluded_linear_names(model: nn.Module) -> set[str]:
    """Names of the linears that must stay in float: ``lm_head`` and anything tied to the embeddings."""
    embedding_weights: set[int] = set()
    get_in = getattr(model, "get_input_embeddings", None)
    if callable(get_in) and get_in() is not None:
        embedding_weights.add(id(get_in().weight))
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embedding_weights.add(id(module.weight))
    excluded = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.split(".")[-1] == "lm_head" or id(module.weight) in embedding_weights:
            excluded.add(name)
    return excluded


def _check_not_quantized(model: nn.Module) -> None:
    """Quantizing twice would compound errors silently (and quanto would skip layers): refuse it."""
    from optimum.quanto.nn import QModuleMixin

    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QModuleMixin)):
            raise ValueError(
                f"model is already weight-quantized (module {name!r} is {type(module).__name__}); "
                "load a fresh float model before calling quantize_model_weights again"
            )


@register_weight_quantizer("none")
def _quantize_none(model: nn.Module) -> nn.Module:
    return model


@register_weight_quantizer("int8-pertensor")
def _quantize_int8_pertensor(model: nn.Module) -> nn.Module:
    excluded = _excluded_linear_names(model)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in excluded
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(module))
    return model


def _quanto(model: nn.Module, bits: int) -> nn.Module:
    from optimum.quanto import freeze, qint4, qint8, quantize

    # quanto picks the int4 group size itself (128, else the largest multiple of 32 dividing the input
    # features, else per-channel), which is what makes int4 usable on CPU without a custom kernel.
    quantize(model, weights=qint8 if bits == 8 else qint4, exclude=sorted(_excluded_linear_names(model)))
    freeze(model)  # replaces float weights by the quantized tensors, so memory actually drops
    return model


@register_weight_quantizer("int8")
def _quantize_quanto_int8(model: nn.Module) -> nn.Module:
    return _quanto(model, 8)


@register_weight_quantizer("int4")
def _quantize_quanto_int4(model: nn.Module) -> nn.Module:
    return _quanto(model, 4)


def quantize_model_weights(model: nn.Module, method: str) -> nn.Module:
    """Quantize ``model``'s linear weights in place with the method registered as ``method``.

    Returns the same model object (for chaining). ``lm_head`` and embedding-tied linears are left in
    float. Raises ``ValueError`` for an unknown method or an already quantized model.
    """
    quantizer = WEIGHT_QUANTIZERS.get(method)
    if method != "none":
        _check_not_quantized(model)
    return quantizer(model)
