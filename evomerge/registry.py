"""A small generic registry: named entries, duplicates refused, unknown names answered with suggestions."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from evomerge.errors import EvomergeError, unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries of one kind; ``get`` accepts a registered name or a lazy ``module:attr``."""

    def __init__(self, kind: str, entry_type: type | None = None, providers: Sequence[str] = ()) -> None:
        self.kind = kind
        self.entry_type = entry_type  # what a ``module:attr`` must name
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, str] = {}  # name -> ``module:attr``, imported at its first ``get``
        # Modules that register entries when imported (an entry-point table kept in code), imported at
        # the first lookup: the registry's own module need not import them.
        self._providers = list(providers)

    def add(self, name: str, entry: T) -> T:
        self._refuse_duplicate(name)
        self._entries[name] = entry
        return entry

    def add_lazy(self, name: str, target: str) -> None:
        """Register ``name`` as ``target`` (``module:attr``), imported when ``name`` is first asked for."""
        self._refuse_duplicate(name)
        self._lazy[name] = target

    def _refuse_duplicate(self, name: str) -> None:
        if name in self._entries or name in self._lazy:
            raise ValueError(f"{self.kind} {name!r} is already registered")

    def _load_providers(self) -> None:
        while self._providers:
            importlib.import_module(self._providers.pop(0))

    def get(self, name: str) -> T:
        self._load_providers()
        if name in self._entries:
            return self._entries[name]
        if name in self._lazy:
            self._entries[name] = self._import(self._lazy[name])
            del self._lazy[name]
            return self._entries[name]
        if isinstance(name, str) and ":" in name:
            return self._import(name)
        raise unknown(self.kind, name, self.names())

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
        self._load_providers()
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        self._load_providers()
        return iter([*self._entries, *self._lazy])

    def names(self) -> list[str]:
        self._load_providers()
        return sorted([*self._entries, *self._lazy])
