"""Fused kernels for the random-mask methods (dare_ties, dare_linear) under a keyed stream.

With a ``KeyedStream`` an element's uniform is a hash of its index, so the mask need not be drawn,
stored and read back: one compiled loop (``torch.compile``, Inductor's C++ backend) hashes, masks,
weights, elects signs and writes the output, and a first loop computes the l1 norms the rescaling
needs. Per element of a tensor with K experts:

    keep_i = U_i(index) < density_i
    l1_i   = sum |delta_i| over kept elements          (rescale: s_i = |delta_i|_1 / l1_i)
    t_i    = keep_i * delta_i * s_i * w_i
    merged = base + lambda * sum_i m_i t_i / D         (``evomerge.merge.generalized``'s formula)

The results equal the eager path's (same masks; sums in another order, so within float32 rounding).
Compiling takes tens of seconds once per process (Inductor caches the code on disk for the next);
without a working compiler, or with ``EVOMERGE_FUSED=0``, or for tensors under ``MIN_NUMEL``
elements, the eager path runs instead.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from evomerge.merge.base import MergeInputs
from evomerge.merge.sparsify import EPS
from evomerge.merge.streams import KeyedStream, hash_uniform

log = logging.getLogger(__name__)

MIN_NUMEL = 1 << 16  # smaller tensors are not worth a kernel launch over the eager path


def _masked(
    values: torch.Tensor,
    index: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    density: torch.Tensor,
    i: int,
) -> torch.Tensor:
    """Expert ``i``'s ``values`` where its keyed mask keeps the element, else 0."""
    return torch.where(hash_uniform(index, k1[i], k2[i]) < density[i], values, 0.0)


def _kept_l1(deltas: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """sum |delta_i| over each expert's kept elements: deltas (K, n); keys and density (K,)."""
    index = torch.arange(deltas.shape[1], dtype=torch.int64)
    return torch.stack(
        [_masked(deltas[i].abs(), index, k1, k2, density, i).sum() for i in range(deltas.shape[0])]
    )


def _consensus(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    density: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    lam: torch.Tensor,
    normalize: bool,
) -> None:
    """TIES sign election over the masked, rescaled, weighted task vectors; the expert loop is unrolled
    (K is static), so sums run in expert order as on the eager path."""
    index = torch.arange(deltas.shape[1], dtype=torch.int64)
    k = deltas.shape[0]
    # mergekit: (masked * scale) * weight
    t = [_masked(deltas[i], index, k1, k2, density, i) * scale[i] * weight[i] for i in range(k)]
    total = t[0]
    for i in range(1, k):
        total = total + t[i]
    sign = torch.where(total >= 0, 1.0, -1.0)
    agree = [t[i] * sign > 0 for i in range(k)]
    num = torch.where(agree[0], t[0], 0.0)
    for i in range(1, k):
        num = num + torch.where(agree[i], t[i], 0.0)
    if normalize:
        den = torch.where(agree[0], weight[0], 0.0)
        for i in range(1, k):
            den = den + torch.where(agree[i], weight[i], 0.0)
        num = num / torch.where(den == 0, 1.0, den)
    out.copy_(base + num * lam)


def _linear(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    density: torch.Tensor,
    coef: torch.Tensor,
) -> None:
    index = torch.arange(deltas.shape[1], dtype=torch.int64)
    acc = base
    for i in range(deltas.shape[0]):
        acc = acc + _masked(deltas[i], index, k1, k2, density, i) * coef[i]
    out.copy_(acc)


def _dynamic(*tensors: torch.Tensor) -> None:
    """Compile once for every tensor length: the last dimension is dynamic, the expert count static."""
    for t in tensors:
        torch._dynamo.mark_dynamic(t, t.dim() - 1)


@functools.cache
def _compiled() -> dict[str, Any] | None:
    """The compiled kernels, or None when this process cannot compile them (logged once)."""
    if os.environ.get("EVOMERGE_FUSED", "1") == "0":
        return None
    try:
        kernels = {
            f.__name__: torch.compile(f, dynamic=True, fullgraph=True)
            for f in (_kept_l1, _consensus, _linear)
        }
        _smoke(kernels)
    except Exception as e:  # no C++ compiler, an unsupported platform: the eager path is exact too
        log.warning("fused merge kernels unavailable (%s: %s); using the eager path", type(e).__name__, e)
        return None
    return kernels


def _smoke(kernels: dict[str, Any]) -> None:
    """Compile and check every kernel on a small input against the eager functions."""
    g = torch.Generator().manual_seed(0)
    n = MIN_NUMEL + 3
    base, deltas = torch.randn(n, generator=g), torch.randn(2, n, generator=g)
    _dynamic(base, deltas)
    keys = torch.tensor([1, 2]), torch.tensor([3, 4])
    col = torch.tensor([0.3, 0.7])
    assert torch.allclose(kernels["_kept_l1"](deltas, *keys, col), _kept_l1(deltas, *keys, col), rtol=1e-5)
    lam = torch.tensor(1.0)
    for normalize in (False, True):
        a, b = torch.empty(n), torch.empty(n)
        _dynamic(a)
        kernels["_consensus"](a, base, deltas, *keys, col, col, col, lam, normalize)
        _consensus(b, base, deltas, *keys, col, col, col, lam, normalize)
        assert torch.allclose(a, b, atol=1e-6)
    a, b = torch.empty(n), torch.empty(n)
    _dynamic(a)
    kernels["_linear"](a, base, deltas, *keys, col, col)
    _linear(b, base, deltas, *keys, col, col)
    assert torch.allclose(a, b, atol=1e-6)


def applies(x: MergeInputs) -> bool:
    """Whether ``dare`` runs this tensor: a keyed stream, a large enough tensor, a working compiler."""
    return isinstance(x.stream, KeyedStream) and x.numel >= MIN_NUMEL and _compiled() is not None


def dare(x: MergeInputs, params: dict[str, Any], consensus: bool) -> torch.Tensor:
    """dare_ties (``consensus``) or dare_linear on tensor ``x`` with the fused kernels."""
    kernels = _compiled()
    assert kernels is not None and isinstance(x.stream, KeyedStream)
    k = x.n_experts
    deltas = x.deltas.reshape(k, -1)
    out = x.output()
    base = x.flat_base()
    _dynamic(deltas, base, out)
    keys = [x.stream.keys((x.name, i)) for i in range(k)]
    k1 = torch.tensor([a for a, _ in keys], dtype=torch.int64)
    k2 = torch.tensor([b for _, b in keys], dtype=torch.int64)
    density = [float(v) for v in params["density"]]
    weight = [float(v) for v in params["weight"]]
    p = torch.tensor(density, dtype=torch.float32)
    scale = [1.0] * k
    if params.get("rescale", False):
        kept = kernels["_kept_l1"](deltas, k1, k2, p).tolist()
        for i in range(k):
            before = float(x.abs_sum(i))
            if density[i] < 1 and before >= EPS and kept[i] >= EPS:
                scale[i] = float(torch.tensor(before, dtype=torch.float32) / torch.tensor(kept[i]))
    lam = float(params["lambda"])
    if consensus:
        w = torch.tensor(weight, dtype=torch.float32)
        s = torch.tensor(scale, dtype=torch.float32)
        kernels["_consensus"](
            out, base, deltas, k1, k2, p, s, w, torch.tensor(lam), bool(params["normalize"])
        )
        return x.result()
    divisor = float(torch.tensor(weight, dtype=torch.float32).sum())
    if abs(divisor) < 1e-8:
        divisor = 1.0
    norm = divisor if params["normalize"] else 1.0
    coef = torch.tensor([weight[i] * scale[i] / norm * lam for i in range(k)], dtype=torch.float32)
    kernels["_linear"](out, base, deltas, k1, k2, p, coef)
    return x.result()
