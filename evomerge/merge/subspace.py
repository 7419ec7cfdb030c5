"""What the data-free subspace methods (tsv, iso_c, iso_cts, star, cart) share: SVDs of task matrices
cached per tensor, the polar factor that orthogonalises a stacked basis, and writing base + delta.

Every SVD runs in float32 on the tensor's device, once per tensor and worker (``MergeInputs.cached``:
a Merger keeps the result for the whole search; a hand-built ``MergeInputs`` recomputes it), so a
merge in the search costs a few matrix products. A 2-D tensor's thin SVD U diag(s) V^T of an m x n
matrix holds (m + n) r + r floats, r = min(m, n): at most twice the matrix (1 + r / max(m, n) times).
Tensors that are not matrices (norms, biases) take each method's documented fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.base import MergeInputs
from evomerge.merge.kernels import weighted_sum

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (m x r), s (r,), V^T (r x n), float32


def is_matrix(x: MergeInputs) -> bool:
    return x.base.dim() == 2


def float32(x: MergeInputs, i: int) -> torch.Tensor:
    """Expert i's task matrix in float32 (the task vector itself when it is float32: never written)."""
    return x.deltas[i].to(torch.float32)


def svd(x: MergeInputs, a: torch.Tensor, what: str) -> Factors:
    """The thin SVD of ``a``; a failure names the tensor and what was decomposed."""
    try:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    except RuntimeError as e:  # torch's LinAlgError: no convergence (NaN or inf entries)
        raise EvomergeError(f"SVD of {what} of tensor {x.name!r} failed: {str(e).splitlines()[0]}") from None
    return u, s, vh


def task_svd(x: MergeInputs, i: int) -> Factors:
    """The thin SVD of expert i's task matrix (cached: (m + n) r + r floats per expert)."""
    return x.cached(("svd", i), lambda: svd(x, float32(x, i), f"task vector {i}"))


def polar(x: MergeInputs, a: torch.Tensor, what: str) -> torch.Tensor:
    """The orthogonal polar factor P V^T of a = P diag(s) V^T: the orthonormal basis nearest ``a``
    (SVD-based whitening, as TSV-M and Iso-CTS orthogonalise their stacked bases)."""
    u, _, vh = svd(x, a, what)
    return u @ vh


def keep_latest(x: MergeInputs, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
    """A cached value that depends on an integer the genome chooses (a rank, a subspace size): only the
    most recent one per tensor is kept, so a fixed setting costs its SVDs once and a searched one
    never grows the cache."""
    if key not in x.cache:
        for old in [k for k in x.cache if isinstance(k, tuple) and k[:1] == key[:1]]:
            del x.cache[old]
    return x.cached(key, compute)


def add_delta(x: MergeInputs, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Write base + scale * delta (``delta`` float32, the tensor's shape), rounded once into the output."""
    out = x.output().view(x.base.shape)
    out.copy_(torch.add(x.base.to(torch.float32), delta, alpha=scale))
    return x.result()


def add_terms(x: MergeInputs, terms: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Write base + sum_j c_j t_j (flat tensors, e.g. cached float32 matrices) into the output: one
    memory-bound pass (``weighted_sum``), a 16-bit output rounded once."""
    weighted_sum(x.output(), x.flat_base(), 1.0, terms, x.workspace)
    return x.result()


def affine(x: MergeInputs, coefs: Sequence[float], base_coef: float = 1.0) -> torch.Tensor:
    """Write base_coef * base + sum_i coefs_i delta_i: the fallbacks of tensors that are not matrices."""
    terms = [(x.delta(i), float(c)) for i, c in enumerate(coefs)]
    weighted_sum(x.output(), x.flat_base(), base_coef, terms, x.workspace)
    return x.result()


def truncated(
    x: MergeInputs, key: str, factors: Factors, k: int, full: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """U[:, :k] diag(s[:k]) V^T[:k] of ``factors`` (the SVD of the float32 matrix ``full()`` returns),
    float32, kept for the latest ``k`` under ``key`` (``keep_latest``): a merge whose rank did not change
    reads it instead of multiplying. Computed as the head product when k is at most half the rank,
    else as the matrix less its tail product (the fewer multiplications)."""

    def compute() -> torch.Tensor:
        u, s, vh = factors
        if 2 * k <= s.numel():
            return (u[:, :k] * s[:k]) @ vh[:k]
        return full() - (u[:, k:] * s[k:]) @ vh[k:]

    return keep_latest(x, (key, k), compute)
