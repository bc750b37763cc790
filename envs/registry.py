"""A tiny name -> class registry, shared by features and reward terms (lm-eval-harness style).

YAML configs pick features and reward terms by name; the registry turns a name into a class and,
for an unknown name, an error that lists every known one so a typo is a one-look fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """An unknown name: a ValueError (bad input) that is also a KeyError (a failed lookup)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator; a second class under the same name is an error, never a silent override."""

        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {self._entries[name].__qualname__})"
                )
            cls.name = name
            self._entries[name] = cls
            return cls

        return decorator

    def unregister(self, name: str) -> None:
        """Remove an entry (tests and notebooks that define throwaway terms)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> type[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
