"""A merge method: task arithmetic whose task vectors are clipped to [-clip, clip] element-wise."""

import torch

from evomerge.merge import MergeInputs, Param, merge_method
from evomerge.merge.base import per_model


@merge_method(
    "clipped_sum",
    params=[
        Param("weight", "model", low=-10.0, high=10.0),  # one value per expert, required
        Param("clip", "shared", default=0.01, low=0.0, high=1.0, open_low=True),  # one per layer group
    ],
    mergekit=False,  # mergekit has no such method: its recipes export as merged weights (--format hf)
)
def clipped_sum(x: MergeInputs, weight: torch.Tensor, clip: float) -> torch.Tensor:
    """merged = base + sum_i w_i clamp(theta_i - base, -clip, clip)."""
    w = per_model(weight, x.deltas)  # shape (K, 1, ...), on the task vectors' device
    return x.base + (w * x.deltas.clamp(-clip, clip)).sum(dim=0)
