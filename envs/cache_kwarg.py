"""Pass a KV cache to a transformers model under the keyword its ``forward`` accepts.

transformers renamed ``past_key_values`` to ``cache`` (5.24 warns on the old name; 5.40 removes it),
and before the rename ``forward`` has no ``cache`` parameter, so ``cache=`` there would fall into
``**kwargs`` and the model would run with a fresh ``DynamicCache`` without a word. Reading the name off
the signature (once per model class) is right on both sides of the rename. ``generate`` takes the
cache through ``**kwargs`` and forwards it to ``forward``, so it wants the same name.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

__all__ = ["cache_keyword", "with_cache"]

_NAMES = ("cache", "past_key_values")  # newest first


@functools.cache
def _keyword_of(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    for name in _NAMES:
        if name in params:
            return name
    raise TypeError(
        f"{model_class.__name__}.forward takes none of {_NAMES}; it would ignore a KV cache passed to it"
    )


def cache_keyword(model) -> str:
    """``"cache"`` or ``"past_key_values"``: what ``model.forward`` (and ``model.generate``) call the cache."""
    return _keyword_of(type(model))


def with_cache(model, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` to splat into ``model(...)`` or ``model.generate(...)``."""
    return {cache_keyword(model): cache}
