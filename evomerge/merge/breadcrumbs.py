"""breadcrumbs: drop each task vector's largest outliers and smallest entries (Davari & Belilovsky, 2023)."""

from __future__ import annotations

from typing import Any

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.generalized import generalized
from evomerge.merge.sparsify import prepare_magnitude


@implements("breadcrumbs", prepare=prepare_magnitude)
def breadcrumbs(x: MergeInputs, **params: Any) -> torch.Tensor:
    """Ranking |d_i| ascending, keep ranks [n - k - g, n - g) with k = int(density_i n),
    g = int(gamma_i n) (g shrinks when k + g > n): b_i;  merged = base + lambda * sum_i w_i s_i b_i d_i / D,
    s_i the l1 rescale factor when rescale (else 1), D = sum_i w_i when normalize (else 1)."""
    return generalized(x, "magnitude_outliers", False, params)
