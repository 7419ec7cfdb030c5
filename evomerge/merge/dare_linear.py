"""dare_linear: random drop-and-rescale of each task vector, then task arithmetic (Yu et al., 2023)."""

from __future__ import annotations

from typing import Any

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.generalized import generalized
from evomerge.merge.sparsify import prepare_rescale


@implements("dare_linear", prepare=prepare_rescale)
def dare_linear(x: MergeInputs, **params: Any) -> torch.Tensor:
    """merged = base + lambda * sum_i w_i s_i b_i d_i / D with b_i ~ Bernoulli(density_i) per element,
    s_i = |d_i|_1 / |b_i d_i|_1 when rescale (else 1), D = sum_i w_i when normalize (else 1)."""
    return generalized(x, "random", False, params)
