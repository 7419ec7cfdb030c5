"""A small generic registry: named entries, duplicates refused, unknown names answered with suggestions."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

from evomerge.errors import EvomergeError, unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries of one kind; ``get`` accepts a registered name or a lazy ``module:attr``."""

    def __init__(self, kind: str, entry_type: type | None = None) -> None:
        self.kind = kind
        self.entry_type = entry_type  # what a ``module:attr`` must name
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
            return self._import(name)
        raise unknown(self.kind, name, self._entries)

    def _import(self, name: str) -> T:
        module, _, attr = name.partition(":")
        try:
            imported = importlib.import_module(module)
        except Exception as e:  # not found, or the module's own code failed, or a bad name (".x")
            first = (str(e).splitlines() or [""])[0]
            raise EvomergeError(
                f"{self.kind} {name!r} does not import: {type(e).__name__}: {first}"
            ) from None
        if not hasattr(imported, attr):
            raise EvomergeError(f"{self.kind} {name!r}: module {module!r} has no {attr!r}")
        entry = getattr(imported, attr)
        if self.entry_type is not None and not isinstance(entry, self.entry_type):
            raise EvomergeError(
                f"{self.kind} {name!r} is a {type(entry).__name__}, not a {self.entry_type.__name__}; "
                f"registered ones: {', '.join(self.names())}"
            )
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)
