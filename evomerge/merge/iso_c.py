"""iso_c: isotropic merging in the common subspace, Iso-C (Marczak et al., 2025)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.subspace import add_delta, affine, is_matrix, svd


def _direction(x: MergeInputs) -> tuple[torch.Tensor, float]:
    """(U V^T, mean(s)) of the summed task matrix U diag(s) V^T (genome-independent, cached)."""

    def compute() -> tuple[torch.Tensor, float]:
        total = x.deltas.to(torch.float32).sum(dim=0)
        u, s, vh = svd(x, total, "the summed task vectors")
        return u @ vh, float(s.mean())

    return x.cached("iso_c", compute)


def prepare(x: MergeInputs) -> None:
    if is_matrix(x):
        _direction(x)


@implements("iso_c", prepare=prepare)
def iso_c(x: MergeInputs, **shared: float) -> torch.Tensor:
    """Iso-C. For a 2-D tensor, with the summed task matrix sum_i delta_i = U diag(s) V^T:

        merged = base + lambda * mean(s) * U V^T

    (the spectrum flattened to its mean: every direction of the common subspace equally scaled).
    Tensors that are not matrices take the mean the paper and FusionBench use:
    merged = base + lambda / K sum_i delta_i.

    Cached per tensor: U V^T and mean(s), one float32 matrix; a merge is one scaled add.
    """
    lam = shared["lambda"]
    if not is_matrix(x):
        return affine(x, [lam / x.n_experts] * x.n_experts)
    direction, mean = _direction(x)
    return add_delta(x, direction, lam * mean)
