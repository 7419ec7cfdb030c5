"""Merge methods (one module each, registered by name), the in-memory Merger and a mergekit-style API."""

from evomerge.merge import (  # noqa: F401  (registration)
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    linear,
    model_stock,
    nuslerp,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from evomerge.merge.api import merge_state_dicts
from evomerge.merge.base import METHODS, MergeInputs, MergeMethod, Param, get_method, merge_method
from evomerge.merge.merger import Merger

__all__ = [
    "METHODS",
    "MergeInputs",
    "MergeMethod",
    "Merger",
    "Param",
    "get_method",
    "merge_method",
    "merge_state_dicts",
]
