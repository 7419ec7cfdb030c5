"""ties: trim, elect sign, disjoint merge (Yadav et al., 2023)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.generalized import generalized, sign_consensus
from evomerge.merge.sparsify import prepare_magnitude

__all__ = ["sign_consensus", "ties"]


@implements("ties", prepare=prepare_magnitude)
def ties(
    x: MergeInputs, weight: torch.Tensor, density: torch.Tensor, normalize: bool, **shared: float
) -> torch.Tensor:
    """d'_i = w_i * topk_{density_i}(|d_i|) * d_i;  s = sign(sum_i d'_i);  m_i = [sign(d'_i) = s]
    merged = base + lambda * sum_i m_i d'_i / sum_i m_i w_i   (no division when normalize is false).

    ``int8_mask`` only changes mergekit's mask storage type, never the result.
    """
    params = {"weight": weight, "density": density, "normalize": normalize, "lambda": shared["lambda"]}
    return generalized(x, "magnitude", True, params)
