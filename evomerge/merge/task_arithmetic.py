"""task_arithmetic: add weighted task vectors to the base (Ilharco et al., 2022)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, Param, merge_method
from evomerge.merge.generalized import LAMBDA, WEIGHT, combine, generalized

__all__ = ["LAMBDA", "WEIGHT", "combine", "task_arithmetic"]


@merge_method(
    "task_arithmetic",
    params=[WEIGHT, Param("normalize", "shared", default=False, kind=bool), LAMBDA],
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(x: MergeInputs, weight: torch.Tensor, normalize: bool, **shared: float) -> torch.Tensor:
    """merged = base + lambda * sum_i w_i (theta_i - base)   (divided by sum_i w_i when normalize)."""
    return generalized(x, None, False, {"weight": weight, "normalize": normalize, "lambda": shared["lambda"]})
