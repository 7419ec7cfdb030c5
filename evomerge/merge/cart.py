"""cart: centred arithmetic with reduced rank, CART (Choi et al., 2024)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, floats, implements
from evomerge.merge.subspace import Factors, add_terms, affine, is_matrix, svd, truncated


def _centred_matrix(x: MergeInputs, i: int) -> torch.Tensor:
    """Expert i's centred task matrix delta_i - mean_j delta_j, float32."""
    deltas = x.deltas.to(torch.float32)
    return deltas[i] - deltas.mean(dim=0)


def _centred(x: MergeInputs) -> list[Factors]:
    """The thin SVD of each centred task matrix (genome-independent, cached)."""

    def compute() -> list[Factors]:
        return [svd(x, _centred_matrix(x, i), f"centred task vector {i}") for i in range(x.n_experts)]

    return x.cached("cart", compute)


def prepare(x: MergeInputs) -> None:
    if is_matrix(x):
        _centred(x)


@implements("cart", prepare=prepare)
def cart(x: MergeInputs, weight: torch.Tensor, rank_fraction: float, **shared: float) -> torch.Tensor:
    """CART. Centre on the mean of the fine-tunes, theta_avg = base + mean_i delta_i, and add each
    centred task matrix's best rank-k approximation (k = max(1, int(rank_fraction min(m, n)))):

        theta_i - theta_avg = delta_i - mean_j delta_j = U_i diag(s_i) V_i^T
        merged = theta_avg + lambda sum_i w_i U_i[:, :k] diag(s_i[:k]) V_i[:, :k]^T

    At full rank (rank_fraction 1) this is task arithmetic around the mean: theta_avg + lambda
    sum_i w_i (theta_i - theta_avg) (which is theta_avg itself when all w_i are equal). Tensors that
    are not matrices take that full-rank form: merged = base + sum_i (1/K + lambda (w_i - W/K)) delta_i,
    W = sum_j w_j.

    Cached per tensor: the K centred task matrices' thin SVDs (K (m + n) r floats: up to 2 K matrices),
    so any rank_fraction costs no SVD, and their rank-k approximations for the latest k (K matrices), so
    a merge whose k did not change is a weighted sum of 2 K matrices and one whose k did costs K
    products of rank min(k, rank - k).
    """
    lam = shared["lambda"]
    w = floats(weight)
    k_experts = x.n_experts
    if not is_matrix(x):
        total = sum(w)
        return affine(x, [1 / k_experts + lam * (wi - total / k_experts) for wi in w])
    k = max(1, int(rank_fraction * min(x.base.shape)))
    centred = _centred(x)

    kept = [
        truncated(x, f"cart.kept{i}", centred[i], k, lambda i=i: _centred_matrix(x, i))
        for i in range(k_experts)
    ]
    means = [(x.delta(i), 1 / k_experts) for i in range(k_experts)]  # theta_avg - base
    return add_terms(x, means + [(t.view(-1), lam * wi) for t, wi in zip(kept, w, strict=True)])
