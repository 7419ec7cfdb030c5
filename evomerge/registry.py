"""A small generic registry: named entries, duplicates refused, unknown names answered with suggestions.

Every plugin kind (merge methods, estimators, fitness backends, algorithms, model-reference prefixes) is
one :class:`Registry`, and a package outside evomerge adds to it through the registry's entry-point group
(``evomerge.merge_methods``, ``evomerge.estimators``, ``evomerge.fitness_backends``,
``evomerge.algorithms``, ``evomerge.model_references``) in its own ``pyproject.toml``, read at the
registry's first lookup::

    [project.entry-points."evomerge.merge_methods"]
    my_method = "my_package.merging"          # a module: registers its entries when imported
    [project.entry-points."evomerge.algorithms"]
    my_algorithm = "my_package.search:SPEC"   # module:attr: registered under the entry point's name
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from evomerge.errors import EvomergeError, unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries of one kind; ``get`` accepts a registered name or a lazy ``module:attr``."""

    def __init__(
        self,
        kind: str,
        entry_type: type | None = None,
        providers: Sequence[str] = (),
        group: str | None = None,
    ) -> None:
        self.kind = kind
        self.entry_type = entry_type  # what a ``module:attr`` must name
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, str] = {}  # name -> ``module:attr``, imported at its first ``get``
        # Modules that register entries when imported (an entry-point table kept in code), imported at
        # the first lookup: the registry's own module need not import them.
        self._providers = list(providers)
        # The entry-point group other packages register through, read once at the first lookup.
        self.group = group
        self._group_pending = group is not None

    def add(self, name: str, entry: T) -> T:
        self._refuse_duplicate(name)
        self._entries[name] = entry
        return entry

    def setdefault(self, name: str, entry: T) -> None:
        """Add ``entry`` unless ``name`` is registered already (an entry point's ``module:attr`` that
        names the same entry, say); reads no providers."""
        if name not in self._entries and name not in self._lazy:
            self._entries[name] = entry

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
        if self._group_pending:
            self._group_pending = False  # first: a provider's own lookups must not read the group again
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        """Register the group's entry points: ``name = "module:attr"`` lazily as ``name``, and
        ``name = "module"`` by importing the module (which registers its entries itself)."""
        seen: set[tuple[str, str]] = set()
        for ep in importlib.metadata.entry_points(group=self.group):
            if (ep.name, ep.value) in seen:  # the same distribution found twice on the path
                continue
            seen.add((ep.name, ep.value))
            if ":" not in ep.value:
                try:
                    importlib.import_module(ep.value)
                except Exception as e:
                    first = (str(e).splitlines() or [""])[0]
                    raise EvomergeError(
                        f"{self.kind} plugin {ep.name!r} ({self.group}: {ep.value}) does not import: "
                        f"{type(e).__name__}: {first}"
                    ) from None
            elif self._lazy.get(ep.name) != ep.value:
                self.add_lazy(ep.name, ep.value)

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

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def items(self) -> list[tuple[str, T]]:
        """Every entry, lazy ones imported."""
        return [(name, self.get(name)) for name in self]

    def __contains__(self, name: object) -> bool:
        self._load_providers()
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        self._load_providers()
        return iter([*self._entries, *self._lazy])

    def names(self) -> list[str]:
        self._load_providers()
        return sorted([*self._entries, *self._lazy])
