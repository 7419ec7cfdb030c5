"""evomerge: evolutionary model merging.

Importing the package has no side effects; heavy modules (torch, transformers, ray, lm-eval) load
when first used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Merger": "evomerge.merge",
    "merge_state_dicts": "evomerge.merge",
    "METHODS": "evomerge.merge",
    "Recipe": "evomerge.recipe",
    "RunConfig": "evomerge.config",
    "load_config": "evomerge.config",
    "Search": "evomerge.search",
    "resume_search": "evomerge.search",
    "RunFolder": "evomerge.runfolder",
    "SearchSpace": "evomerge.searchspace",
    "ModelSet": "evomerge.models",
    "Store": "evomerge.store",
    "EvomergeError": "evomerge.errors",
    "load_run": "evomerge.run",
    "Run": "evomerge.run",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")


__all__ = sorted(_LAZY)
