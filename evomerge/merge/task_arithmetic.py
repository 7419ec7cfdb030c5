"""task_arithmetic: add weighted task vectors to the base (Ilharco et al., 2022)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.generalized import combine, generalized

__all__ = ["combine", "task_arithmetic"]


@implements("task_arithmetic")
def task_arithmetic(x: MergeInputs, weight: torch.Tensor, normalize: bool, **shared: float) -> torch.Tensor:
    """merged = base + lambda * sum_i w_i (theta_i - base)   (divided by sum_i w_i when normalize)."""
    return generalized(x, None, False, {"weight": weight, "normalize": normalize, "lambda": shared["lambda"]})
