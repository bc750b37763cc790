"""MixedPrecisionKVCache: a transformers ``Cache`` whose blocks each keep their own bit-width.

Why a new cache: transformers' ``QuantizedCache`` applies one bit-width to everything, and the
research seeds only simulated precision (quantize, then keep the dequantized floats). Here every
committed block really is stored as packed codes at the bits chosen for it, so the memory an
agent saves is memory the process does not hold.

Life of a token: the model's ``update`` call appends new keys/values to a full-precision *pending*
buffer; :meth:`MixedPrecisionKVCache.commit` quantizes everything pending, in every layer, as one
block (keys per channel over the block's tokens, values per token over the head dimension, as
KIVI). Attention sees the dequantized committed blocks followed by the pending buffer.

Consecutive blocks at the same bits are merged into one *segment* (when the keys end on a complete
token group), so dequantizing a long uniform cache costs a handful of tensor ops per layer rather
than a handful per block, and every segment is dequantized straight into its slice of the tensor
handed to attention (no per-segment temporaries, no ``torch.cat``). The dequantized tensor lives
only for the layer's attention call: between steps the cache holds codes, never floats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from quant.uniform import QuantizedTensor, check_bits, concat, dequantize, dequantize_cat, quantize

#: A generation-time policy: given the cache (pending length, block bits, ...) return the bits of
#: the pending block. Called every ``interval`` new tokens when set on the cache.
BitsPolicy = Callable[["MixedPrecisionKVCache"], int]

KEY_AXIS = -2  # keys share a scale per channel across a group of tokens
VALUE_AXIS = -1  # values share a scale per token across a group of channels


def _empty_like_tokens(t: torch.Tensor) -> torch.Tensor:
    """A zero-token buffer with ``t``'s other dims; unlike ``t[..., :0, :]`` it frees ``t``'s memory."""
    return t.new_empty((*t.shape[:-2], 0, t.shape[-1]))


@dataclass
class _Segment:
    """Consecutive committed tokens of one layer stored at the same bits."""

    bits: int
    keys: QuantizedTensor
    values: QuantizedTensor

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes()


class MixedPrecisionLayer(CacheLayerMixin):
    """One layer's storage: committed segments (packed) + a full-precision pending buffer."""

    is_sliding = False
    is_croppable = True

    def __init__(self, group_size: int = 64, symmetric: bool = False):
        super().__init__()
        self.group_size = group_size
        self.symmetric = symmetric
        self.segments: list[_Segment] = []
        # >1 while the cache is branched along the batch, see MixedPrecisionKVCache.branch
        self.batch_expand = 1

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
            if self.keys.shape[-2] == 0 and not self.segments:
                self.lazy_initialization(key_states, value_states)
            else:
                raise ValueError(
                    f"new keys of shape {tuple(key_states.shape)} do not match the cache's "
                    f"(batch, heads, ., head_dim) = {tuple(self.keys.shape)}"
                )
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if not self.segments:
            return self.keys, self.values
        return self._assemble(self.keys, KEY_AXIS), self._assemble(self.values, VALUE_AXIS)

    def _assemble(self, pending: torch.Tensor, axis: int) -> torch.Tensor:
        """Committed segments, dequantized, followed by the pending tokens, in one fresh tensor.

        Every segment is dequantized straight into its slice of the result (no float temporaries,
        no ``torch.cat``): per step and tensor that is a uint8 unpack, one float copy and one in-place
        multiply-add, against ``DynamicCache``'s one ``cat``. The result is transient; only codes are kept.
        """
        committed = self.committed_length
        out = pending.new_empty((*pending.shape[:-2], committed + pending.shape[-2], pending.shape[-1]))
        parts = [segment.keys if axis == KEY_AXIS else segment.values for segment in self.segments]
        dequantize_cat(parts, out.narrow(-2, 0, committed), dim=-2)
        out.narrow(-2, committed, pending.shape[-2]).copy_(pending)
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.committed_length + self.pending_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.segments = []
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
        return sum(s.length for s in self.segments)

    def committed(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized committed keys/values, in token order (batch 1 while branched)."""
        if not self.segments:
            raise ValueError("nothing committed yet")
        keys = torch.cat([dequantize(s.keys, dtype) for s in self.segments], dim=-2)
        values = torch.cat([dequantize(s.values, dtype) for s in self.segments], dim=-2)
        return keys, values

    def commit(self, bits: int) -> None:
        """Quantize every pending token of this layer as one block at ``bits``."""
        if self.pending_length == 0:
            raise ValueError("nothing pending to commit")
        new = _Segment(
            bits,
            quantize(self.keys, bits, KEY_AXIS, self.group_size, self.symmetric),
            quantize(self.values, bits, VALUE_AXIS, self.group_size, self.symmetric),
        )
        last = self.segments[-1] if self.segments else None
        if last is not None and last.bits == bits and last.keys.complete_groups:
            self.segments[-1] = _Segment(
                bits, concat([last.keys, new.keys], dim=-2), concat([last.values, new.values], dim=-2)
            )
        else:
            self.segments.append(new)
        self.keys = _empty_like_tokens(self.keys)
        self.values = _empty_like_tokens(self.values)

    def nbytes(self, include_pending: bool = True) -> int:
        total = sum(s.nbytes() for s in self.segments)
        if include_pending and self.keys is not None:
            total += self.keys.numel() * self.keys.element_size() * 2
        return total

    def fp16_nbytes(self, include_pending: bool = True) -> int:
        total = sum(s.keys.fp16_nbytes() + s.values.fp16_nbytes() for s in self.segments)
        if include_pending and self.keys is not None:
            total += self.keys.numel() * 2 * 2
        return total


class MixedPrecisionKVCache(Cache):
    """A KV cache in which every committed block keeps its own bit-width (2/3/4/8/16).

    Pass it as the cache of ``model(...)`` or ``model.generate(...)`` of any HF causal LM (``cache=``;
    ``past_key_values=`` before transformers 5.24).
    Without a ``policy`` nothing is ever committed automatically: call :meth:`commit` yourself
    (the environment does, once per step). With a ``policy``, every time ``interval`` or more
    tokens are pending when a new forward starts, ``policy(self)`` picks their bits and they are
    committed, so a trained controller can drive real decoding.
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
    ):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if num_layers is None and config is not None:
            text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
            num_layers = text_config.num_hidden_layers
        self.group_size = group_size
        self.symmetric = symmetric
        self.policy = policy
        self.interval = interval
        self.block_bits: list[tuple[int, int]] = []  # (bits, tokens) per committed block, in order

        def make_layer() -> MixedPrecisionLayer:
            return MixedPrecisionLayer(group_size, symmetric)

        if num_layers is not None:
            super().__init__(layers=[make_layer() for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=make_layer)

    # --- transformers Cache contract ----------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0 and self.policy is not None and self.pending_length >= self.interval:
            self.commit(int(self.policy(self)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reset(self):
        super().reset()
        self.block_bits = []

    # --- mixed precision ----------------------------------------------------------------------
    @property
    def pending_length(self) -> int:
        return self.layers[0].pending_length if self.layers else 0

    @property
    def committed_length(self) -> int:
        return sum(n for _, n in self.block_bits)

    def commit(self, bits: int) -> None:
        """Quantize all pending tokens of every layer as one block stored at ``bits``."""
        bits = check_bits(bits)
        if any(layer.batch_expand > 1 for layer in self.layers):
            raise RuntimeError("cannot commit inside branch(): branched tokens are rolled back on exit")
        pending = self.pending_length
        if pending == 0:
            raise ValueError("commit() with nothing pending: run tokens through the model first")
        for layer in self.layers:
            layer.commit(bits)
        self.block_bits.append((bits, pending))

    def pending_error(self, bits: int) -> torch.Tensor:
        """Per pending token: how much committing now at ``bits`` would distort its keys and values.

        For every layer, ``||x_t - deq(q(x_t))||^2`` of keys and values together, divided by the
        block's mean ``||x_t||^2``, then averaged over layers; shape ``[pending tokens]``. Nothing is
        committed. Why relative to the block mean rather than to the token's own norm: an outlier
        token (an attention sink, a delimiter with massive activations) stretches every per-channel
        key scale of its group, so the damage shows up as error on its *neighbours*, which a
        per-token relative error would hide.
        """
        bits = check_bits(bits)
        if self.pending_length == 0:
            raise ValueError("pending_error() with nothing pending: run tokens through the model first")
        total = None
        for layer in self.layers:
            err = torch.zeros(layer.keys.shape[-2], dtype=torch.float32, device=layer.keys.device)
            norm = torch.zeros_like(err)
            for x, axis in ((layer.keys, KEY_AXIS), (layer.values, VALUE_AXIS)):
                xf = x[:1].float()  # batch 1: the pending block of the episode
                qt = quantize(xf, bits, axis, self.group_size, self.symmetric)
                err += (xf - dequantize(qt, torch.float32)).square().sum(dim=(0, 1, 3))
                norm += xf.square().sum(dim=(0, 1, 3))
            rel = err / norm.mean().clamp_min(1e-12)
            total = rel if total is None else total.add_(rel)
        return total / len(self.layers)

    def nbytes(self, include_pending: bool = True) -> int:
        """Bytes actually held: packed codes + fp16 scales/zero-points (+ the pending buffer)."""
        return sum(layer.nbytes(include_pending) for layer in self.layers)

    def fp16_nbytes(self, include_pending: bool = True) -> int:
        """Bytes the same tokens would take in an fp16 cache."""
        return sum(layer.fp16_nbytes(include_pending) for layer in self.layers)

    def average_bits(self) -> float:
        """Token-weighted average bit-width of the committed blocks (nan when none)."""
        tokens = self.committed_length
        return sum(b * n for b, n in self.block_bits) / tokens if tokens else float("nan")

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
            if layer.keys is not None:
                layer.keys = layer.keys.expand(batch_size, *layer.keys.shape[1:])
                layer.values = layer.values.expand(batch_size, *layer.values.shape[1:])
            layer.batch_expand = batch_size
        try:
            yield self
        finally:
            for layer, (keys, values) in zip(self.layers, saved, strict=True):
                layer.keys, layer.values = keys, values
                layer.batch_expand = 1
