"""Find the project's catalogues (searchspaces/, fitness/, experiments/) from a checkout or an installed wheel."""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import unknown

_PKG = Path(__file__).resolve().parent


def catalog_dir(kind: str) -> Path:
    """The folder of one catalogue: the checkout's top-level folder, else the copy packed in the wheel."""
    for candidate in (_PKG.parent / kind, _PKG / "_catalog" / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"catalogue {kind!r} not found next to {_PKG}")


def find(kind: str, name: str, suffix: str = ".yaml") -> Path:
    """A catalogue entry by name (``per_layer``) or a path to a file (``my/space.yaml``)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    root = catalog_dir(kind)
    entry = root / f"{name}{suffix}"
    if entry.exists():
        return entry
    raise unknown(kind.rstrip("s").replace("searchspace", "search space"), name, _names(root, suffix))


def _names(root: Path, suffix: str) -> list[str]:
    return [p.relative_to(root).as_posix()[: -len(suffix)] for p in root.rglob(f"*{suffix}")]
