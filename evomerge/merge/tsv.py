"""tsv: Task Singular Vectors merge, TSV-M (Gargiulo et al., 2025)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, floats, implements
from evomerge.merge.kernels import weighted_sum
from evomerge.merge.subspace import (
    affine,
    is_matrix,
    keep_latest,
    polar,
    task_svd,
)


def _rank(x: MergeInputs, fraction: float) -> int:
    """k = int(r (1/K) rank_fraction), at least 1: FusionBench's int(r * sv_reduction) at fraction 1."""
    r = min(x.base.shape)
    return max(1, int(r * (1 / x.n_experts) * fraction))


def _parts(x: MergeInputs, k: int) -> torch.Tensor:
    """The K task parts U[:, block_i] diag(s_i[:k]) V^T[block_i] of the merge (K x m x n, float32) for
    the rank k, with U = polar([U_1k ... U_Kk]) and V^T = polar([V_1k ... V_Kk])^T."""

    def compute() -> torch.Tensor:
        kept = {i for i in range(x.n_experts) if ("svd", i) in x.cache}  # another method's (star)
        svds = [task_svd(x, i) for i in range(x.n_experts)]
        u = polar(x, torch.cat([u[:, :k] for u, _, _ in svds], dim=1), "the stacked left singular vectors")
        vh = polar(x, torch.cat([vh[:k] for _, _, vh in svds], dim=0), "the stacked right singular vectors")
        for i in set(range(x.n_experts)) - kept:  # the full per-task SVDs are not needed once stacked
            x.cache.pop(("svd", i), None)
        blocks = [slice(i * k, (i + 1) * k) for i in range(x.n_experts)]
        return torch.stack([(u[:, b] * svds[i][1][:k]) @ vh[b] for i, b in enumerate(blocks)])

    return keep_latest(x, ("tsv", k), compute)


def prepare(x: MergeInputs) -> None:
    if is_matrix(x):
        _parts(x, _rank(x, 1.0))


@implements("tsv", prepare=prepare)
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

    The merge is linear in the weights, base + lambda sum_i w_i P_i with P_i = U[:, block_i]
    diag(s_i[:k]) V^T[block_i], so what is cached per tensor is the K parts P_i for the latest k (K
    float32 copies of the matrix); a new rank_fraction recomputes them (K SVDs of the task matrices and
    two of the stacked bases). A merge is then the task-arithmetic kernel over the parts.
    """
    lam = shared["lambda"]
    w = floats(weight)
    if not is_matrix(x):
        return affine(x, [lam * wi / x.n_experts for wi in w])
    parts = _parts(x, _rank(x, rank_fraction))
    terms = [(parts[i].view(-1), lam * wi) for i, wi in enumerate(w)]
    weighted_sum(x.output(), x.flat_base(), 1.0, terms, x.workspace)
    return x.result()
