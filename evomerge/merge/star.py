"""star: spectral truncation and rescale, STAR (Lee et al., 2025)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, floats, implements
from evomerge.merge.subspace import add_terms, affine, float32, is_matrix, task_svd, truncated


def _truncated(x: MergeInputs, i: int, eta: float) -> tuple[int, torch.Tensor]:
    """(r_i, c_i): task i's kept rank, the smallest whose singular values reach eta of its nuclear
    norm, and the rescale factor sum(s) / sum(s[:r_i]) (0 for an all-zero task matrix)."""
    _, s, _ = task_svd(x, i)
    energy = x.cached(("star.cumsum", i), lambda: torch.cumsum(s, dim=0))
    total = energy[-1]
    r = min(int(torch.searchsorted(energy, total * eta)) + 1, s.numel())
    kept = energy[r - 1]
    return r, torch.where(kept > 0, total / kept, torch.zeros_like(kept))


def prepare(x: MergeInputs) -> None:
    if is_matrix(x):
        for i in range(x.n_experts):
            _truncated(x, i, 1.0)


@implements("star", prepare=prepare)
def star(x: MergeInputs, weight: torch.Tensor, eta: float, **shared: float) -> torch.Tensor:
    """STAR. For a 2-D tensor, each task matrix delta_i = U_i diag(s_i) V_i^T is truncated at the
    smallest rank r_i with sum(s_i[:r_i]) >= eta sum(s_i) and its kept spectrum rescaled to the
    original nuclear norm, then the truncated task vectors are added:

        delta_i' = (sum(s_i) / sum(s_i[:r_i])) U_i[:, :r_i] diag(s_i[:r_i]) V_i[:, :r_i]^T
        merged = base + lambda sum_i w_i delta_i'

    (the paper averages: w_i = 1/K; its code takes eta in percent, here a fraction in (0, 1]).
    |delta_i'|_* = |delta_i|_*: the truncation drops the noisy tail and keeps each task's size.
    Tensors that are not matrices are not truncated: merged = base + lambda sum_i w_i delta_i.

    Cached per tensor: each task matrix's thin SVD and its cumulative spectrum (K (m + n) r floats: up
    to 2 K matrices), so any eta costs no SVD, and each task's truncated matrix for its latest r_i (K
    matrices), so a merge whose ranks did not change (eta fixed, or moved less than a singular value's
    share) is a weighted sum of K matrices, and one whose ranks did costs K products of rank
    min(r_i, rank - r_i).
    """
    lam = shared["lambda"]
    w = floats(weight)
    if not is_matrix(x):
        return affine(x, [lam * wi for wi in w])
    terms = []
    for i, wi in enumerate(w):
        r, c = _truncated(x, i, eta)
        kept = truncated(x, f"star.kept{i}", task_svd(x, i), r, lambda i=i: float32(x, i))
        terms.append((kept.view(-1), lam * wi * float(c)))
    return add_terms(x, terms)
