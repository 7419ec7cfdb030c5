"""della: magnitude-ranked random drop (MAGPRUNE), rescale, TIES sign election (Deep et al., 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.base import MergeInputs, MergeMethod, implements
from evomerge.merge.generalized import generalized
from evomerge.merge.sparsify import prepare_rescale


def check_epsilon(method: MergeMethod, params: dict[str, Any], experts: Sequence[Any]) -> None:
    """mergekit refuses density +/- epsilon outside (0, 1) wherever it prunes (0 < density < 1)."""
    for e, d, eps in zip(experts, params["density"].tolist(), params["epsilon"].tolist(), strict=True):
        if 0 < d < 1 and (d + eps >= 1 or d - eps <= 0):
            raise EvomergeError(
                f"merge method {method.name!r} parameters 'density'={d:g} and 'epsilon'={eps:g} "
                f"(expert {e!r}): density - epsilon and density + epsilon must lie in (0, 1)"
            )


@implements("della", check=check_epsilon, prepare=prepare_rescale)
def della(x: MergeInputs, **params: Any) -> torch.Tensor:
    """b_i ~ Bernoulli(p) per element, p = density_i - epsilon_i + 2 epsilon_i (r - 1)/(c - 1), r the
    rank of |d_i| in its row of c entries (1 = smallest);  d'_i = w_i s_i b_i d_i (s_i the l1 rescale
    factor when rescale);  m_i = [sign(d'_i) = sign(sum_j d'_j)]
    merged = base + lambda * sum_i m_i d'_i / D,  D = sum_i m_i w_i when normalize else 1."""
    return generalized(x, "della_magprune", True, params)
