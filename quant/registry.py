"""One name -> object registry for everything a config picks by name.

Features, reward terms, policies and weight quantizers are all chosen by name in YAML; this class
turns a name into what was registered under it (a class or a plain function) and, for an unknown
name, raises an error listing every known one so a typo is a one-look fix. A second registration
under a taken name is an error, never a silent override.

It lives in ``quant``, the bottom package, because ``quant.weights`` registers its quantizers here
and ``quant`` may import neither ``envs`` nor ``agents``; everything above can import it.

With ``entry_point_group`` set, a name not registered in-process is looked up among the installed
distributions' entry points of that group (``importlib.metadata``) and loaded on first use, so a
plug-in package adds entries by declaring them, without anyone importing it first.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """An unknown name: a ValueError (bad input) that is also a KeyError (a failed lookup)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class Registry(Generic[T]):
    """Names -> registered objects of one ``kind`` (used in messages: "reward term", "policy kind")."""

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator for a class or function. A registered class gets ``cls.name = name``."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name`` (the non-decorator form of :meth:`register`)."""
        if name in self._entries:
            owner = self._entries[name]
            raise ValueError(
                f"{self.kind} {name!r} is already registered (by {getattr(owner, '__qualname__', owner)!r})"
            )
        if isinstance(obj, type):
            obj.name = name  # classes learn the name configs know them by
        self._entries[name] = obj

    def unregister(self, name: str) -> None:
        """Remove an entry (tests and notebooks that define throwaway entries)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry called ``name``, loading it from an entry point if that is where it lives."""
        if name not in self._entries:
            entry_points = self._entry_points()
            if name not in entry_points:
                known = ", ".join(sorted({*self._entries, *entry_points}))
                raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}")
            self.add(name, entry_points[name].load())
        return self._entries[name]

    def names(self) -> list[str]:
        """Names registered in-process (entry points not yet loaded are not listed)."""
        return sorted(self._entries)

    def _entry_points(self) -> dict[str, Any]:
        if self.entry_point_group is None:
            return {}
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.entry_point_group)}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
