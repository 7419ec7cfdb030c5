"""task_arithmetic: add weighted task vectors to the base (Ilharco et al., 2022)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, Param, merge_method, per_model

WEIGHT = Param("weight", "model", low=-10.0, high=10.0)
LAMBDA = Param("lambda", "shared", default=1.0, low=-10.0, high=10.0)


def combine(
    x: MergeInputs,
    deltas: torch.Tensor,
    weight: torch.Tensor,
    normalize: bool,
    lam: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic tail: base + lambda * sum_i w_i m_i d_i / divisor.

    ``divisor`` is sum_i w_i m_i where a sign-consensus mask m is given (0 -> 1), else sum_i w_i
    (|.| < 1e-8 -> 1); it is applied only when ``normalize``.
    """
    w = per_model(weight, deltas)
    weighted = deltas * w
    if mask is not None:
        weighted.mul_(mask)
        mixed = weighted.sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return x.base + mixed


@merge_method(
    "task_arithmetic",
    params=[WEIGHT, Param("normalize", "shared", default=False, kind=bool), LAMBDA],
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(x: MergeInputs, weight: torch.Tensor, normalize: bool, **shared: float) -> torch.Tensor:
    """merged = base + lambda * sum_i w_i (theta_i - base)   (divided by sum_i w_i when normalize)."""
    return combine(x, x.deltas, weight, normalize, shared["lambda"])
