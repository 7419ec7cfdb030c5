"""iso_cts: isotropic merging in the common and task-specific subspaces, Iso-CTS (Marczak et al., 2025)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.subspace import (
    Factors,
    add_delta,
    affine,
    float32,
    is_matrix,
    keep_latest,
    polar,
    svd,
)


def _sizes(x: MergeInputs, fraction: float) -> tuple[int, int]:
    """(c, t): the common subspace's size and each task's, with K t + c = r = min(m, n), as
    FusionBench divides them (its rounding, kept from going negative)."""
    r, k = min(x.base.shape), x.n_experts
    c = int(r * fraction)
    specific = round((r - c) / k) * k
    if specific > r:  # FusionBench's round() can overshoot r at small fractions: a negative c
        specific = (r - c) // k * k
    c = r - specific
    return c, int((r - c) / k)


def _summed(x: MergeInputs) -> Factors:
    """The SVD of the summed task matrix (genome-independent, cached)."""
    return x.cached(
        "iso_cts.svd", lambda: svd(x, x.deltas.to(torch.float32).sum(dim=0), "the summed task vectors")
    )


def _direction(x: MergeInputs, c: int, t: int) -> tuple[torch.Tensor, float]:
    """(U V^T, mean(s)) of the combined common and task-specific space for the sizes (c, t)."""

    def compute() -> tuple[torch.Tensor, float]:
        u, s, vh = _summed(x)
        uc = u[:, :c]
        us, ss, vhs = [uc], [s[:c]], [vh[:c]]
        for i in range(x.n_experts):
            d = float32(x, i)
            ui, si, vhi = svd(x, d - uc @ (uc.T @ d), f"task vector {i} outside the common subspace")
            us.append(ui[:, :t])
            ss.append(si[:t])
            vhs.append(vhi[:t])
        basis_u = polar(x, torch.cat(us, dim=1), "the combined left bases")
        basis_vh = polar(x, torch.cat(vhs, dim=0), "the combined right bases")
        return basis_u @ basis_vh, float(torch.cat(ss).mean())

    return keep_latest(x, ("iso_cts", c, t), compute)


def prepare(x: MergeInputs) -> None:
    if is_matrix(x):
        _summed(x)


@implements("iso_cts", prepare=prepare)
def iso_cts(x: MergeInputs, common_space_fraction: float, **shared: float) -> torch.Tensor:
    """Iso-CTS. For a 2-D tensor (r = min(m, n)), with the summed task matrix U diag(s) V^T:

        c ~ r * common_space_fraction, t = (r - c) / K   (rounded so that K t + c = r, as FusionBench)
        R_i = delta_i - U_c U_c^T delta_i = P_i diag(q_i) Q_i^T      (task i outside the common space)
        A = polar([U_c, P_1[:, :t] ... P_K[:, :t]]),  B = polar([V_c, Q_1[:, :t] ... Q_K[:, :t]])
        merged = base + lambda * mean(s[:c], q_1[:t], ..., q_K[:t]) * A B^T

    Iso-C's flattened common subspace plus each task's own top directions outside it (the residuals),
    orthogonalised together (polar factor, as for tsv). Tensors that are not matrices take the mean:
    merged = base + lambda / K sum_i delta_i.

    Cached per tensor: the SVD of the summed task matrix (at most two matrices) and, for the latest
    (c, t), A B^T and its scale (one matrix); a new common_space_fraction that moves c recomputes the
    latter (K SVDs of residuals and two of the combined bases). A merge is one scaled add.
    """
    lam = shared["lambda"]
    if not is_matrix(x):
        return affine(x, [lam / x.n_experts] * x.n_experts)
    direction, mean = _direction(x, *_sizes(x, common_space_fraction))
    return add_delta(x, direction, lam * mean)
