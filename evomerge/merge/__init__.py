"""Merge methods (one module each, registered by name), the in-memory Merger and a mergekit-style API."""

from evomerge.merge import (  # noqa: F401  (registration)
    breadcrumbs,
    breadcrumbs_ties,
    cart,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    iso_c,
    iso_cts,
    linear,
    lines,
    magmax,
    model_stock,
    nuslerp,
    sce,
    slerp,
    star,
    task_arithmetic,
    ties,
    tsv,
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
