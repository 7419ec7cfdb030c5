"""Merge methods (one module each, registered by name) and the in-memory Merger."""

from evomerge.merge import linear, task_arithmetic, ties  # noqa: F401  (registration)
from evomerge.merge.base import METHODS, MergeInputs, MergeMethod, Param, get_method, merge_method
from evomerge.merge.merger import Merger

__all__ = ["METHODS", "MergeInputs", "MergeMethod", "Merger", "Param", "get_method", "merge_method"]
