"""dare_ties: random drop-and-rescale of each task vector, then TIES sign election (Yu et al., 2023)."""

from __future__ import annotations

from typing import Any

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.generalized import generalized
from evomerge.merge.sparsify import prepare_rescale


@implements("dare_ties", prepare=prepare_rescale)
def dare_ties(x: MergeInputs, **params: Any) -> torch.Tensor:
    """d'_i = w_i * s_i * b_i * d_i with b_i ~ Bernoulli(density_i) per element and, when rescale,
    s_i = |d_i|_1 / |b_i d_i|_1;  S = sum_i d'_i;  m_i = [sign(d'_i) = sign(S)]
    merged = base + lambda * sum_i m_i d'_i / D,  D = sum_i m_i w_i when normalize else 1."""
    return generalized(x, "random", True, params)
