"""KV-cache backends the env can run: ours, transformers' quanto ``QuantizedCache``, and a plain cache.

The quanto cache is the off-the-shelf answer our mixed-precision cache has to beat, so it runs in the
same env, on the same blocks, scored the same way (``EnvConfig(cache="quanto")``), and its memory is
measured the same way ours is: :func:`kv_cache_nbytes` counts bytes actually held (packed codes,
scales, zero-points and the full-precision residual window), not ``tokens * bits / 8``.

Every backend answers :class:`EpisodeCache`, the part of :class:`~quant.kv_cache.MixedPrecisionKVCache`'s
interface the env uses (commit a block, bytes, average bits, branch to score endings), so the env holds
one cache object whatever the backend and passes it to the model as is.

Behaviour of the quanto baseline worth knowing (transformers 5.x ``QuantizedLayer``):

* The first ``update`` (the prefill) quantizes *all* of its tokens at once; afterwards new tokens
  sit in a float residual buffer until it reaches ``residual_length``, then the whole cache is
  dequantized, concatenated and re-quantized (errors can compound over flushes). Its bits are fixed,
  so ``commit`` only books the block: the policy has nothing to choose.
* With the default ``axis=0`` quanto groups ``q_group_size`` *consecutive elements of the flattened
  (heads, tokens, head_dim) tensor*, so a group spans several tokens of one head. Quantizing fails
  unless ``heads * tokens * head_dim`` is a multiple of ``q_group_size``; :class:`QuantoKVCache`
  rejects group sizes that do not divide ``num_key_value_heads * head_dim`` so that every length works.
* It cannot be broadcast along the batch, so endings are scored one at a time, each from a snapshot
  of the prefix (``branch_limit = 1``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

from torch import nn
from transformers import DynamicCache, PreTrainedConfig, QuantizedCache

from quant.kv_cache import BlockBits, MixedPrecisionKVCache, bit_pair
from quant.weights import tensor_nbytes

__all__ = [
    "CACHE_KINDS",
    "QUANTO_CACHE_BITS",
    "DynamicKVCache",
    "EpisodeCache",
    "QuantoKVCache",
    "check_cache_bits",
    "episode_cache",
    "kv_cache_nbytes",
    "quanto_cache",
]

QUANTO_CACHE_BITS: tuple[int, ...] = (2, 4)
CACHE_KINDS: tuple[str, ...] = ("mixed", "quanto", "dynamic")
FULL_PRECISION_BITS = 16  # what a never-quantized block counts as (features and average_bits use 16)
_FP16_BYTES = 2


class EpisodeCache(Protocol):
    """What the env asks of a KV cache, besides being a transformers ``Cache`` the model can update."""

    #: ``(bits, tokens)`` of every committed block, in order.
    block_bits: list[tuple[int, int]]
    #: The most endings one :meth:`branch` may score together (None: any number).
    branch_limit: int | None

    @property
    def pending_length(self) -> int: ...

    def commit(self, bits: BlockBits) -> None: ...  # an int, or a (key_bits, value_bits) pair (mixed only)

    def nbytes(self, include_pending: bool = True) -> int: ...

    def fp16_nbytes(self, include_pending: bool = True) -> int: ...

    def average_bits(self) -> float: ...

    def branch(self, batch_size: int) -> AbstractContextManager[Any]: ...


def _config_of(model_or_config: nn.Module | PreTrainedConfig) -> PreTrainedConfig:
    if isinstance(model_or_config, PreTrainedConfig):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if isinstance(config, PreTrainedConfig):
        return config
    raise ValueError(
        f"quanto_cache expects a transformers model or its PreTrainedConfig, got {type(model_or_config).__name__}"
    )


def _kv_elements_per_token(config: PreTrainedConfig) -> int:
    """``num_key_value_heads * head_dim``: the elements one token adds to one layer's keys."""
    text = config.get_text_config(decoder=True)
    n_heads = text.num_attention_heads
    n_kv = getattr(text, "num_key_value_heads", None) or n_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    return n_kv * head_dim


def _layers_nbytes(layers: Iterable[Any]) -> int:
    """Bytes held by transformers cache layers (see :func:`kv_cache_nbytes` for what is counted)."""
    total = 0
    for layer in layers:
        for name in ("_quantized_keys", "_quantized_values"):
            q = getattr(layer, name, None)
            if isinstance(q, tuple):  # the HQQ backend stores (codes, meta-dict); not ours to count
                raise ValueError(f"kv_cache_nbytes cannot count {type(layer).__name__}; use the quanto backend")
            total += tensor_nbytes(q)
        total += tensor_nbytes(getattr(layer, "keys", None)) + tensor_nbytes(getattr(layer, "values", None))
    return total


class _BookedBlocks:
    """Block bookkeeping and snapshot branching for transformers caches whose bits the policy cannot change.

    ``commit`` books the tokens that arrived since the last commit as one block, and remembers the
    bytes held at that moment (what ``nbytes(False)`` reports, as ours reports committed blocks only).
    ``branch`` snapshots every layer (a shallow copy: these layers rebind their tensors on ``update``
    rather than writing into them) and puts the snapshots back on exit, so the cache is exactly as it was.
    """

    layers: list[Any]
    bits: tuple[int, ...]
    branch_limit: int | None = None

    def _init_blocks(self, config: PreTrainedConfig) -> None:
        self.block_bits: list[tuple[int, int]] = []
        self._committed_nbytes = 0
        self._fp16_bytes_per_token = _FP16_BYTES * 2 * _kv_elements_per_token(config) * len(self.layers)

    @property
    def committed_length(self) -> int:
        return sum(n for _, n in self.block_bits)

    @property
    def pending_length(self) -> int:
        return self.get_seq_length() - self.committed_length

    def commit(self, bits: int) -> None:
        if bits not in self.bits:
            raise ValueError(f"{type(self).__name__} stores {self.bits} bits; cannot commit at {bits}")
        pending = self.pending_length
        if pending == 0:
            raise ValueError("commit() with nothing pending: run tokens through the model first")
        self.block_bits.append((bits, pending))
        self._committed_nbytes = _layers_nbytes(self.layers)

    def nbytes(self, include_pending: bool = True) -> int:
        return _layers_nbytes(self.layers) if include_pending else self._committed_nbytes

    def fp16_nbytes(self, include_pending: bool = True) -> int:
        tokens = self.get_seq_length() if include_pending else self.committed_length
        return self._fp16_bytes_per_token * tokens

    @contextmanager
    def branch(self, batch_size: int) -> Iterator[Any]:
        if batch_size < 1 or (self.branch_limit is not None and batch_size > self.branch_limit):
            raise ValueError(f"{type(self).__name__} branches 1..{self.branch_limit or 'any'} rows, got {batch_size}")
        saved = [copy.copy(layer) for layer in self.layers]
        try:
            if batch_size > 1:
                for layer in self.layers:
                    if layer.keys is not None:
                        layer.keys = layer.keys.expand(batch_size, *layer.keys.shape[1:])
                        layer.values = layer.values.expand(batch_size, *layer.values.shape[1:])
            yield self
        finally:
            self.layers[:] = saved


class QuantoKVCache(_BookedBlocks, QuantizedCache):
    """transformers' ``QuantizedCache(backend="quanto")`` at fixed ``nbits``, with the env's interface.

    ``nbits`` must be 2 or 4 (what quanto's cache backend supports). ``q_group_size`` must divide
    ``num_key_value_heads * head_dim`` (see the module docstring); ``residual_length`` is how many
    recent tokens are kept in full precision between re-quantizations.
    """

    branch_limit = 1

    def __init__(self, config: PreTrainedConfig, nbits: int, q_group_size: int = 64, residual_length: int = 128):
        if nbits not in QUANTO_CACHE_BITS:
            raise ValueError(f"quanto KV cache supports nbits in {QUANTO_CACHE_BITS}, got {nbits!r}")
        if q_group_size <= 0 or residual_length < 0:
            raise ValueError(
                f"q_group_size must be > 0 and residual_length >= 0, got {q_group_size} and {residual_length}"
            )
        per_token = _kv_elements_per_token(config)
        if per_token % q_group_size != 0:
            divisors = [g for g in (16, 32, 64, 128) if per_token % g == 0]
            raise ValueError(
                f"q_group_size={q_group_size} does not divide num_key_value_heads * head_dim = {per_token}, so "
                f"quanto would fail on some sequence lengths; use one of {divisors or [per_token]}"
            )
        super().__init__(
            backend="quanto", config=config, nbits=nbits, q_group_size=q_group_size, residual_length=residual_length
        )
        self.nbits = nbits
        self.bits = (nbits,)
        self._init_blocks(config)

    def average_bits(self) -> float:
        """Token-weighted bits of what the cache holds: the residual window is full precision (16)."""
        tokens = self.get_seq_length()
        if not self.block_bits or not tokens:
            return float("nan")
        residual = sum(
            layer.keys.shape[-2] if layer.keys is not None and layer.keys.dim() == 4 else 0 for layer in self.layers
        )
        residual_frac = residual / (len(self.layers) * tokens)
        return self.nbits * (1 - residual_frac) + FULL_PRECISION_BITS * residual_frac


class DynamicKVCache(_BookedBlocks, DynamicCache):
    """A plain ``DynamicCache``: every token in the model's own precision (the full-precision reference)."""

    def __init__(self, config: PreTrainedConfig):
        super().__init__(config=config)
        self.bits = (FULL_PRECISION_BITS,)
        self._init_blocks(config)

    def average_bits(self) -> float:
        return float(FULL_PRECISION_BITS) if self.block_bits else float("nan")


def quanto_cache(
    model_or_config: nn.Module | PreTrainedConfig,
    nbits: int,
    q_group_size: int = 64,
    residual_length: int = 128,
) -> QuantoKVCache:
    """A fresh quanto ``QuantizedCache`` for one generation / forward sequence (see :class:`QuantoKVCache`)."""
    return QuantoKVCache(_config_of(model_or_config), nbits, q_group_size, residual_length)


def check_cache_bits(kind: str, bits: Sequence[BlockBits], sink_tokens: int = 0, layer_groups: int = 1) -> None:
    """Raise unless ``bits`` is a menu the ``kind`` of cache can store (quanto and dynamic have one width).

    Only our mixed cache has (key, value) pairs, fp16 sink tokens and per-layer-group settings; the
    library caches store every layer and token alike, so asking them for any of these is an error.
    """
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {CACHE_KINDS}, got {kind!r}")
    pairs = [bit_pair(b) for b in bits]
    if kind != "mixed":
        split = [b for b, (k, v) in zip(bits, pairs, strict=True) if k != v]
        if split:
            raise ValueError(
                f"cache={kind!r} stores keys and values at one width; the (key_bits, value_bits) pairs {split} "
                "need cache='mixed' (or list plain widths)"
            )
        if sink_tokens:
            raise ValueError(f"cache={kind!r} has no fp16 sink tokens; set sink_tokens=0 or use cache='mixed'")
        if layer_groups != 1:
            raise ValueError(f"cache={kind!r} stores every layer alike; set layer_groups=1 or use cache='mixed'")
        bits = [k for k, _ in pairs]
    if kind == "quanto" and (len(bits) != 1 or bits[0] not in QUANTO_CACHE_BITS):
        raise ValueError(
            f"cache='quanto' stores one fixed width: bits must be one quanto nbits of {QUANTO_CACHE_BITS}, "
            f"got {tuple(bits)}"
        )
    if kind == "dynamic" and tuple(bits) != (FULL_PRECISION_BITS,):
        raise ValueError(f"cache='dynamic' keeps full precision: bits must be [16], got {tuple(bits)}")


def episode_cache(
    kind: str,
    model_or_config: nn.Module | PreTrainedConfig,
    bits: Sequence[BlockBits],
    group_size: int,
    sink_tokens: int = 0,
    keep_dequantized: bool = False,
    rotate_keys: bool = False,
    rotate_values: bool = False,
    expected_tokens: int = 0,
) -> EpisodeCache:
    """A fresh cache of ``kind`` ("mixed", "quanto" or "dynamic") for one episode over ``bits``; the
    first ``sink_tokens`` tokens stay fp16 (mixed only, see :func:`check_cache_bits`).
    ``keep_dequantized``: the mixed cache also keeps its committed prefix dequantized (faster forwards,
    same numbers, more resident memory); ``rotate_keys`` / ``rotate_values``: it stores its quantized keys
    (values) rotated (mixed only; :class:`~quant.kv_cache.MixedPrecisionKVCache`); ``expected_tokens``: the tokens
    the episode will reach, so the mixed cache's kept floats are allocated once."""
    check_cache_bits(kind, bits, sink_tokens)
    if (rotate_keys or rotate_values) and kind != "mixed":
        raise ValueError(f"rotate_keys and rotate_values need the mixed cache, got cache {kind!r}")
    config = _config_of(model_or_config)
    if kind == "mixed":
        return MixedPrecisionKVCache(
            config=config, group_size=group_size, sink_tokens=sink_tokens, keep_dequantized=keep_dequantized,
            rotate_keys=rotate_keys, rotate_values=rotate_values, expected_tokens=expected_tokens,
        )
    if kind == "quanto":
        return QuantoKVCache(config, bit_pair(bits[0])[0], q_group_size=group_size)
    return DynamicKVCache(config)


def kv_cache_nbytes(cache: Any) -> int:
    """Bytes of key/value state actually held by a transformers cache.

    Counting rule, per layer:

    * quantized layers (``QuantizedCache``): the quantized keys and values through
      :func:`quant.weights.tensor_nbytes`, i.e. quanto's packed uint8 codes (2 or 4 bits per element,
      rounded up per packed row), its scales and its zero-points (``_shift``), plus the float residual
      buffers ``keys`` / ``values`` (empty right after a flush);
    * plain layers (``DynamicCache`` and friends): ``keys`` + ``values``.

    A cache that defines its own ``nbytes()`` (every :class:`EpisodeCache`) is asked directly, so one
    function serves every cache in a comparison. Not counted: Python objects and bookkeeping ints.
    """
    own = getattr(cache, "nbytes", None)
    if callable(own):
        return int(own())
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"kv_cache_nbytes expects a transformers Cache with .layers, got {type(cache).__name__}")
    return _layers_nbytes(layers)
