"""tsv: Task Singular Vectors merge, TSV-M (Gargiulo et al., 2025)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, merge_method
from evomerge.merge.subspace import (
    SCALE,
    WEIGHT_1,
    add_delta,
    affine,
    is_matrix,
    keep_latest,
    polar,
    rank_fraction,
    task_svd,
)


def _rank(x: MergeInputs, fraction: float) -> int:
    """k = int(r (1/K) rank_fraction), at least 1: FusionBench's int(r * sv_reduction) at fraction 1."""
    r = min(x.base.shape)
    return max(1, int(r * (1 / x.n_experts) * fraction))


def _bases(x: MergeInputs, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(polar([U_1k ... U_Kk]), [s_1k ... s_Kk], polar([V_1k ... V_Kk])^T) for the rank k."""

    def compute() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kept = {i for i in range(x.n_experts) if ("svd", i) in x.cache}  # another method's (star)
        svds = [task_svd(x, i) for i in range(x.n_experts)]
        u = polar(x, torch.cat([u[:, :k] for u, _, _ in svds], dim=1), "the stacked left singular vectors")
        vh = polar(x, torch.cat([vh[:k] for _, _, vh in svds], dim=0), "the stacked right singular vectors")
        s = torch.cat([s[:k] for _, s, _ in svds])
        for i in set(range(x.n_experts)) - kept:  # the full per-task SVDs are not needed once stacked
            x.cache.pop(("svd", i), None)
        return u, s, vh

    return keep_latest(x, ("tsv", k), compute)


def prepare(x: MergeInputs) -> None:
    if is_matrix(x):
        _bases(x, _rank(x, 1.0))


@merge_method(
    "tsv",
    params=[WEIGHT_1, rank_fraction(1.0), SCALE],
    reference="https://arxiv.org/abs/2412.00081",
    mergekit=False,
    min_experts=2,
    prepare=prepare,
    cache_models=(2.0, 0.0),
)
def tsv(x: MergeInputs, weight: torch.Tensor, rank_fraction: float, **shared: float) -> torch.Tensor:
    """TSV-M. For a 2-D tensor with task matrices delta_i = U_i diag(s_i) V_i^T (r = min(m, n)):

        k = max(1, int(r / K * rank_fraction))          (the paper: rank_fraction 1, each task 1/K)
        U = polar([U_1[:, :k] ... U_K[:, :k]]),  V = polar([V_1[:, :k] ... V_K[:, :k]])
        merged = base + lambda U diag(w_1 s_1[:k], ..., w_K s_K[:k]) V^T

    polar(A) = P Q^T for A = P diag(.) Q^T, the orthonormal basis nearest A (SVD-based whitening, as the
    paper and FusionBench orthogonalise). ``weight`` w_i scales task vector i before the merge
    (FusionBench's per-task alpha): the SVD of w_i delta_i has the same bases and w_i s_i, so the
    weights only rescale the stacked spectrum (w_i = 0 drops task i's directions but keeps them in the
    bases). Tensors that are not matrices take the task-arithmetic mean the paper and FusionBench use:
    merged = base + lambda / K sum_i w_i delta_i.

    Cached per tensor: the two orthonormal stacked bases and the K k singular values for the latest k
    ((m + n) K k floats, at most twice the matrix); a new rank_fraction recomputes them (K SVDs of the
    task matrices and two of the stacked bases). A merge is one m x Kk by Kk x n product.
    """
    lam = shared["lambda"]
    w = [float(v) for v in weight]
    if not is_matrix(x):
        return affine(x, [lam * wi / x.n_experts for wi in w])
    k = _rank(x, rank_fraction)
    u, s, vh = _bases(x, k)
    coef = torch.tensor(w, dtype=torch.float32, device=s.device).repeat_interleave(k) * s
    return add_delta(x, (u * coef) @ vh, lam)
