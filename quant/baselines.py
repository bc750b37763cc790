"""The library baseline for KV quantization: transformers' ``QuantizedCache`` with the quanto backend.

It is the off-the-shelf answer our mixed-precision cache has to beat, so its memory must be measured
the same way ours is. :func:`kv_cache_nbytes` therefore counts bytes actually held (packed codes,
scales, zero-points and the full-precision residual window), not ``tokens * bits / 8``.

Behaviour of the baseline worth knowing (transformers 5.x ``QuantizedLayer``):

* The first ``update`` (the prefill) quantizes *all* of its tokens at once; afterwards new tokens
  sit in a float residual buffer until it reaches ``residual_length``, then the whole cache is
  dequantized, concatenated and re-quantized (errors can compound over flushes).
* With the default ``axis=0`` quanto groups ``q_group_size`` *consecutive elements of the flattened
  (heads, tokens, head_dim) tensor*, so a group spans several tokens of one head. Quantizing fails
  unless ``heads * tokens * head_dim`` is a multiple of ``q_group_size``; :func:`quanto_cache`
  rejects group sizes that do not divide ``num_key_value_heads * head_dim`` so that every length works.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PreTrainedConfig, QuantizedCache

from quant.weights import tensor_nbytes

__all__ = ["QUANTO_CACHE_BITS", "kv_cache_nbytes", "quanto_cache"]

QUANTO_CACHE_BITS: tuple[int, ...] = (2, 4)


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


def quanto_cache(
    model_or_config: nn.Module | PreTrainedConfig,
    nbits: int,
    q_group_size: int = 64,
    residual_length: int = 128,
) -> QuantizedCache:
    """A fresh ``QuantizedCache(backend="quanto")`` for one generation / forward sequence.

    ``nbits`` must be 2 or 4 (what quanto's cache backend supports). ``q_group_size`` must divide
    ``num_key_value_heads * head_dim`` (see the module docstring); ``residual_length`` is how many
    recent tokens are kept in full precision between re-quantizations.
    """
    if nbits not in QUANTO_CACHE_BITS:
        raise ValueError(f"quanto KV cache supports nbits in {QUANTO_CACHE_BITS}, got {nbits!r}")
    if q_group_size <= 0 or residual_length < 0:
        raise ValueError(
            f"q_group_size must be > 0 and residual_length >= 0, got {q_group_size} and {residual_length}"
        )
    config = _config_of(model_or_config)
    per_token = _kv_elements_per_token(config)
    if per_token % q_group_size != 0:
        divisors = [g for g in (16, 32, 64, 128) if per_token % g == 0]
        raise ValueError(
            f"q_group_size={q_group_size} does not divide num_key_value_heads * head_dim = {per_token}, so "
            f"quanto would fail on some sequence lengths; use one of {divisors or [per_token]}"
        )
    return QuantizedCache(
        backend="quanto",
        config=config,
        nbits=nbits,
        q_group_size=q_group_size,
        residual_length=residual_length,
    )


def kv_cache_nbytes(cache: Any) -> int:
    """Bytes of key/value state actually held by a transformers cache.

    Counting rule, per layer:

    * quantized layers (``QuantizedCache``): the quantized keys and values through
      :func:`quant.weights.tensor_nbytes`, i.e. quanto's packed uint8 codes (2 or 4 bits per element,
      rounded up per packed row), its scales and its zero-points (``_shift``), plus the float residual
      buffers ``keys`` / ``values`` (empty right after a flush);
    * plain layers (``DynamicCache`` and friends): ``keys`` + ``values``.

    A cache that defines its own ``nbytes()`` (our ``MixedPrecisionKVCache``) is asked directly, so one
    function serves every cache in a comparison. Not counted: Python objects and bookkeeping ints.
    """
    own = getattr(cache, "nbytes", None)
    if callable(own):
        return int(own())
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(
            f"kv_cache_nbytes expects a transformers Cache with .layers, got {type(cache).__name__}"
        )
    total = 0
    for layer in layers:
        for name in ("_quantized_keys", "_quantized_values"):
            q = getattr(layer, name, None)
            if isinstance(q, tuple):  # the HQQ backend stores (codes, meta-dict); not ours to count
                raise ValueError(
                    f"kv_cache_nbytes cannot count {type(layer).__name__}; use the quanto backend"
                )
            total += tensor_nbytes(q)
        total += tensor_nbytes(getattr(layer, "keys", None)) + tensor_nbytes(getattr(layer, "values", None))
    return total
