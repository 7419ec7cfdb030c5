"""plugin_average: a merge method registered from outside evomerge."""

from __future__ import annotations

import torch

from evomerge.merge import MergeInputs, Param, merge_method


@merge_method(
    "plugin_average",
    params=[Param("weight", "model", default=1.0, low=0.0, high=1.0)],
    mergekit=False,
)
def plugin_average(x: MergeInputs, weight: torch.Tensor) -> torch.Tensor:
    """merged = base + sum_i w_i (theta_i - base) / sum_i w_i."""
    w = weight.to(device=x.base.device, dtype=x.deltas.dtype)
    w = w / w.sum().clamp_min(1e-12)
    return x.base + (w.reshape((-1,) + (1,) * x.base.dim()) * x.deltas).sum(0).to(x.base.dtype)
