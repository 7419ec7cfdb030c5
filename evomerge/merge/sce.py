"""sce: select by variance, calculate weights by energy, erase minority signs (Wan et al., 2024)."""

from __future__ import annotations

import torch

from evomerge.merge import fused
from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.generalized import sign_consensus
from evomerge.merge.kernels import as_float32, chunks
from evomerge.merge.orderstats import OrderSketch, select_direct
from evomerge.merge.sparsify import surplus


def _variance(x: MergeInputs, sl: slice, out: torch.Tensor) -> torch.Tensor:
    """Population variance across the task vectors for elements ``sl``, into ``out`` (float32).

    torch.var accumulates in float64 (and is ~100 ns per element across a short leading axis); the
    two-pass float64 formula here rounds to the same float32 values at ~2 ns per element."""
    m = sl.stop - sl.start
    mean = x.workspace.buf("sce.mean", m, torch.float64)
    acc = x.workspace.buf("sce.acc", m, torch.float64)
    tmp = x.workspace.buf("sce.tmp", m, torch.float64)
    k = x.n_experts
    mean.copy_(x.delta(0)[sl])
    for i in range(1, k):
        mean.add_(x.delta(i)[sl])
    mean.div_(k)
    for i in range(k):
        tmp.copy_(x.delta(i)[sl]).sub_(mean)
        if i == 0:
            torch.mul(tmp, tmp, out=acc)
        else:
            acc.addcmul_(tmp, tmp)
    return out.copy_(acc.div_(k))


def _sketch(x: MergeInputs) -> OrderSketch:
    """Order statistics of the variance (genome-independent, cached); its zero count gives mergekit's
    ``count_nonzero(var)``."""

    def compute() -> OrderSketch:
        var = x.workspace.buf("sort", x.numel)
        for sl in chunks(x.numel, x.chunk):
            _variance(x, sl, var[sl])
        return OrderSketch(var, var)  # sorted in place

    return x.cached("sce.var", compute)


def prepare(x: MergeInputs) -> None:
    _sketch(x)


def _count(nonzero: int, select_topk: float) -> int:
    """mergekit's k = int(count_nonzero(var) * density): a float32 product (it rounds up at times)."""
    return int(torch.tensor(nonzero, device="cpu") * select_topk)


def _threshold(x: MergeInputs, select_topk: float) -> tuple[float | None, torch.Tensor | None]:
    """Keep var >= the returned value except the returned flat indices (the surplus of values tied
    with the threshold, so exactly k survive as with mergekit's topk); None keeps everything."""
    if select_topk >= 1:
        return None, None
    if select_topk <= 0:
        return float("inf"), None
    n = x.numel
    var: torch.Tensor | None = None
    if x.persistent:
        sketch = _sketch(x)
        k = _count(n - sketch.zeros, select_topk)
        if k == 0:
            return float("inf"), None
        sel = sketch.select(n - k, lambda sl, buf: _variance(x, sl, buf), x.workspace)
    else:
        var = torch.empty(n, device=x.device)
        _variance(x, slice(0, n), var)
        k = _count(int(torch.count_nonzero(var)), select_topk)
        if k == 0:
            return float("inf"), None
        sel = select_direct(var, n - k)
    drop = surplus(sel, n - k, n - 1)
    if drop is not None:
        drop = _topk_losers(x, sel.equal, k, var)
    return sel.value, drop


def _topk_losers(x: MergeInputs, tied: torch.Tensor, k: int, var: torch.Tensor | None) -> torch.Tensor:
    """The tied indices that ``torch.topk(var, k)`` leaves out, as mergekit's mask does.

    When variances tie at the threshold and only some of them fit in the top k, which ones topk keeps
    is not a rule of index or value but the path of its selection over the whole tensor, so run it (a
    rare case: about one tensor in 200 of a SmolLM2-size model at ``select_topk`` 0.3). ``var``: the
    variances when the caller has them all (computed here otherwise)."""
    if var is None:
        var = torch.empty(x.numel, device=x.device)
        for sl in chunks(x.numel, x.chunk):
            _variance(x, sl, var[sl])
    kept = torch.topk(var, k=k, largest=True).indices  # mergekit's call: the same tie-break
    return tied[~torch.isin(tied, kept)]


def _coefficients(energy: list[float], n: int, k: int) -> list[float]:
    """c_i = mean(v_i^2) / sum_j mean(v_j^2), the means in float32 as mergekit; 1/K when the sum is
    below 1e-6."""
    weights = torch.tensor([v / n for v in energy], dtype=torch.float32, device="cpu")
    total = float(weights.sum())
    return [1.0 / k] * k if abs(total) < 1e-6 else [float(w) / total for w in weights]


@implements("sce", prepare=prepare)
def sce(x: MergeInputs, select_topk: float, int8_mask: bool) -> torch.Tensor:
    """Select: b = [var_i(delta_i) among the top int(select_topk * #nonzero) variances], v_i = b delta_i;
    Calculate: c_i = mean(v_i^2) / sum_j mean(v_j^2) (1/K when that sum < 1e-6);
    Erase: m_i = [sign(v_i) = sign(sum_j v_j)];
    merged = base + sum_i c_i m_i v_i / max(sum_i c_i m_i, 1e-6)."""
    k = x.n_experts
    n = x.numel
    thr, drop = _threshold(x, select_topk)
    if fused.applies_unkeyed(x):  # a Merger's large model: two compiled passes

        def fused_energy() -> list[float]:
            return fused.sce_energy(x, thr, drop)

        e = x.cached("sce.energy", fused_energy) if thr is None else fused_energy()
        return fused.sce_merge(x, thr, drop, _coefficients(e, n, k))
    ws = x.workspace
    size = min(n, x.chunk)
    vs = [ws.buf(f"sce.v{i}", size) for i in range(k)]
    var_buf, mask = ws.buf("sce.var", size), ws.buf("sce.mask", size)
    # the selection, computed once; shares the byte-mask slot of the random sparsifiers
    keep = ws.buf("sparsify.mask0", n, torch.uint8) if thr is not None else None

    def selected(sl: slice, first: bool) -> list[torch.Tensor]:
        m = sl.stop - sl.start
        if thr is None:  # (16-bit task vectors: in float32, as the masked ones are)
            return [as_float32(x.delta(i)[sl], vs[i][:m]) for i in range(k)]
        if first:
            torch.ge(_variance(x, sl, var_buf[:m]), thr, out=mask[:m])
            if drop is not None:
                bounds = torch.tensor([sl.start, sl.stop], device=drop.device)
                a, b = torch.searchsorted(drop, bounds).tolist()
                mask[:m].index_fill_(0, drop[a:b] - sl.start, 0)
            keep[sl].copy_(mask[:m])
        else:
            mask[:m].copy_(keep[sl])
        return [torch.mul(x.delta(i)[sl], mask[:m], out=vs[i][:m]) for i in range(k)]

    def energy() -> list[float]:
        dots = []  # read back once: no device sync per chunk
        for sl in chunks(n, x.chunk):
            dots.extend(torch.dot(v, v) for v in selected(sl, True))
        e = [0.0] * k
        for j, d in enumerate(torch.stack(dots).tolist() if dots else []):
            e[j % k] += d
        return e

    coef = _coefficients(x.cached("sce.energy", energy) if thr is None else energy(), n, k)

    out = x.output()
    base = x.flat_base()
    s, sign, sel, num, den = (ws.buf(f"gta.{b}", size) for b in ("S", "M", "sel", "num", "den"))
    ones = ws.ones(size)
    for sl in chunks(n, x.chunk):
        m = sl.stop - sl.start
        terms = [(v, c, c) for v, c in zip(selected(sl, False), coef, strict=True)]
        sign_consensus(terms, s[:m], sign[:m], sel[:m], num[:m], den[:m], ones[:m])
        num[:m].div_(den[:m].clamp_(min=1e-6))
        torch.add(base[sl], num[:m], out=out[sl])
    return x.result()
