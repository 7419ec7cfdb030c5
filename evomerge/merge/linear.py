"""linear: weighted average of the models (Wortsman et al., model soups)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.kernels import weighted_sum


@implements("linear")
def linear(x: MergeInputs, weight: torch.Tensor, base_weight: float, normalize: bool) -> torch.Tensor:
    """merged = sum_i w_i * theta_i / sum_i w_i   (without the division when normalize is false).

    The inputs are the experts plus the base with ``base_weight`` (mergekit: the base is one more input
    with its own ``weight``; 0 leaves it out). Computed as c_b base + sum_i c_i delta_i with
    c_i = w_i / total and c_b = (sum_i w_i + base_weight) / total.
    """
    w = [float(v) for v in weight.to(torch.float32)]
    total = (
        float(torch.tensor(w + [base_weight], dtype=torch.float32, device="cpu").sum()) if normalize else 1.0
    )
    base_coef = (sum(w) + base_weight) / total
    terms = [(x.delta(i), wi / total) for i, wi in enumerate(w)]
    weighted_sum(x.output(), x.flat_base(), base_coef, terms, x.workspace)
    return x.result()
