"""A small generic registry: named entries, duplicates refused, unknown names answered with suggestions."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from evomerge.errors import unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries of one kind; ``get`` accepts a registered name or a lazy ``module:attr``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            module, _, attr = name.partition(":")
            return getattr(importlib.import_module(module), attr)
        raise unknown(self.kind, name, self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)
