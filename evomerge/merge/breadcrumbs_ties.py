"""breadcrumbs_ties: breadcrumbs sparsification with TIES sign election (Davari & Belilovsky, 2023)."""

from __future__ import annotations

from typing import Any

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.generalized import generalized
from evomerge.merge.sparsify import prepare_magnitude


@implements("breadcrumbs_ties", prepare=prepare_magnitude)
def breadcrumbs_ties(x: MergeInputs, **params: Any) -> torch.Tensor:
    """d'_i = w_i s_i b_i d_i with b_i breadcrumbs' band mask (ranks [n - k - g, n - g) of |d_i|,
    k = int(density_i n), g = int(gamma_i n));  m_i = [sign(d'_i) = sign(sum_j d'_j)]
    merged = base + lambda * sum_i m_i d'_i / D,  D = sum_i m_i w_i when normalize else 1."""
    return generalized(x, "magnitude_outliers", True, params)
