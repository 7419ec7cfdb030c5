"""della_linear: magnitude-ranked random drop (MAGPRUNE) and rescale, then task arithmetic (Deep et al., 2024)."""

from __future__ import annotations

from typing import Any

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.della import check_epsilon
from evomerge.merge.generalized import generalized
from evomerge.merge.sparsify import prepare_rescale


@implements("della_linear", check=check_epsilon, prepare=prepare_rescale)
def della_linear(x: MergeInputs, **params: Any) -> torch.Tensor:
    """merged = base + lambda * sum_i w_i s_i b_i d_i / D with della's rank-dependent Bernoulli mask b_i
    (p = density_i - epsilon_i + 2 epsilon_i (r - 1)/(c - 1) by the row rank r of |d_i|), s_i the l1
    rescale factor when rescale (else 1), D = sum_i w_i when normalize (else 1)."""
    return generalized(x, "della_magprune", False, params)
