"""ties: trim, elect sign, disjoint merge (Yadav et al., 2023)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, Param, merge_method, per_model
from evomerge.merge.task_arithmetic import LAMBDA, WEIGHT, combine


def sign_consensus(weighted: torch.Tensor) -> torch.Tensor:
    """Mask of entries whose sign agrees with the sign of the column sum (ties toward +; zeros never)."""
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == majority


@merge_method(
    "ties",
    params=[
        WEIGHT,
        Param("density", "model", default=1.0, low=0.0, high=1.0),
        Param("normalize", "shared", default=True, kind=bool),
        LAMBDA,
        Param("int8_mask", "shared", default=False, kind=bool),
    ],
    reference="https://arxiv.org/abs/2306.01708",
)
def ties(
    x: MergeInputs, weight: torch.Tensor, density: torch.Tensor, normalize: bool, **shared: float
) -> torch.Tensor:
    """d'_i = w_i * topk_{density_i}(|d_i|) * d_i;  s = sign(sum_i d'_i);  m_i = [sign(d'_i) = s]
    merged = base + lambda * sum_i m_i d'_i / sum_i m_i w_i   (no division when normalize is false).

    ``int8_mask`` only changes mergekit's mask storage type, never the result.
    """
    deltas = torch.stack(
        [d * x.magnitude_mask(i, float(p)) for i, (d, p) in enumerate(zip(x.deltas, density, strict=True))]
    )
    mask = sign_consensus(deltas * per_model(weight, deltas))
    return combine(x, deltas, weight, normalize, shared["lambda"], mask)
