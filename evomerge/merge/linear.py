"""linear: weighted average of the models (Wortsman et al., model soups)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, Param, merge_method


@merge_method(
    "linear",
    params=[
        Param("weight", "model", low=-10.0, high=10.0),
        Param("base_weight", "shared", default=0.0, low=-10.0, high=10.0),
        Param("normalize", "shared", default=True, kind=bool),
    ],
    reference="https://arxiv.org/abs/2203.05482",
)
def linear(x: MergeInputs, weight: torch.Tensor, base_weight: float, normalize: bool) -> torch.Tensor:
    """merged = sum_i w_i * theta_i / sum_i w_i   (without the division when normalize is false).

    The inputs are the experts plus the base with ``base_weight`` (mergekit: the base is one more input
    with its own ``weight``; 0 leaves it out).
    """
    w = weight.to(x.deltas.dtype)
    total = w.sum() + base_weight
    # sum_i w_i (base + d_i) + w_b base = (sum w + w_b) base + sum_i w_i d_i
    out = torch.tensordot(w, x.deltas, dims=1) if x.n_experts else torch.zeros_like(x.base)
    out.add_(x.base, alpha=float(total))
    if normalize:
        out.div_(total)
    return out
