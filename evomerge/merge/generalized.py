"""mergekit's generalized task arithmetic: sparsify each task vector, weight, elect signs, sum, scale.

task_arithmetic, ties, dare_*, breadcrumbs*, della* are this one computation with a different
sparsification (``evomerge.merge.sparsify``) and with or without TIES' sign election:

    d'_i  = w_i * s_i * sparse_i(delta_i)              (s_i: l1 rescale factor, 1 without rescale)
    m_i   = [sign(d'_i) = sign(sum_j d'_j)]            (consensus only; sign(0) never agrees, ties -> +)
    merged = base + lambda * sum_i m_i d'_i / D         D = sum_i m_i w_i (0 -> 1) with consensus,
                                                        sum_i w_i (|.| < 1e-8 -> 1) without,
                                                        and D = 1 when normalize is false.

Everything runs chunk by chunk into the output. With consensus the weighted terms, their sum and the
masks are computed in mergekit's order and precision, so the elected signs are bit-identical (up to
four experts; more may differ where the sum is within one rounding of zero).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from evomerge.merge import fused
from evomerge.merge.base import MergeInputs, floats
from evomerge.merge.kernels import as_float32, chunks, narrow
from evomerge.merge.sparsify import Sparse, rescale_factor, sparsify


def generalized(
    x: MergeInputs,
    sparsification: str | None,
    consensus: bool,
    params: dict,
) -> torch.Tensor:
    """Run one registered generalized method: sparsify every expert with ``sparsification`` using the
    per-model ``density`` (and ``gamma``/``epsilon``), then ``combine``. Random masks from a keyed
    stream run as one fused kernel (``evomerge.merge.fused``) where it applies."""
    if (sparsification == "random" and fused.applies(x)) or (
        sparsification == "della_magprune" and fused.applies_della(x)
    ):
        return _fused_random(x, sparsification, params, consensus)
    k = x.n_experts
    weight = floats(params["weight"])
    sparse: list[Sparse] = []
    for i in range(k):
        if sparsification is None:
            sparse.append(sparsify(x, i, "magnitude", 1.0))
            continue
        extra = {key: float(params[key][i]) for key in ("gamma", "epsilon") if key in params}
        sparse.append(
            sparsify(
                x,
                i,
                sparsification,
                float(params["density"][i]),
                rescale=params.get("rescale", False),
                **extra,
            )
        )
    normalize, lam = bool(params["normalize"]), float(params["lambda"])
    if sparsification in MAGNITUDE and fused.applies_unkeyed(x):
        if consensus:
            return fused.band_consensus(x, sparse, weight, lam, normalize)
        scales = [1.0 if sp.scale is None else sp.scale for sp in sparse]
        return fused.band_linear(x, sparse, linear_coefficients(weight, scales, normalize, lam))
    return combine(x, sparse, weight, normalize=normalize, lam=lam, consensus=consensus)


MAGNITUDE = ("magnitude", "magnitude_outliers")  # what fused.band_* take: Band, Dense or Zero


def _fused_random(x: MergeInputs, sparsification: str, params: dict, consensus: bool) -> torch.Tensor:
    """dare_ties/della (``consensus``) or dare_linear/della_linear with the fused kernels: the same
    rescaling and coefficients as the eager path, the masks recomputed inside the kernels."""
    density, weight = floats(params["density"]), floats(params["weight"])
    ranks = None
    masks = density
    if sparsification == "della_magprune":
        masks, ranks = fused.della_masks(x, density, floats(params["epsilon"]))
    scale = [1.0] * x.n_experts
    if params.get("rescale", False):
        kept = fused.kept_l1(x, masks, ranks)
        for i, p in enumerate(density):
            factor = rescale_factor(float(x.abs_sum(i)), kept[i]) if p < 1 else None
            scale[i] = 1.0 if factor is None else factor
    lam = float(params["lambda"])
    if consensus:
        return fused.consensus(x, masks, scale, weight, lam, bool(params["normalize"]), ranks)
    coef = linear_coefficients(weight, scale, bool(params["normalize"]), lam)
    return fused.linear(x, masks, coef, ranks)


def linear_coefficients(
    weight: Sequence[float], scale: Sequence[float], normalize: bool, lam: float
) -> list[float]:
    """Each expert's factor in the sum without consensus, as mergekit: w_i s_i / D * lambda, with
    D = sum_i w_i in float32 (|D| < 1e-8 -> 1) when ``normalize``, else 1."""
    divisor = _float32_sum(tuple(weight)) if normalize else 1.0
    return [w * s / divisor * lam for w, s in zip(weight, scale, strict=True)]


@functools.lru_cache(maxsize=256)
def _float32_sum(weight: tuple[float, ...]) -> float:
    """sum(weight) in float32 as mergekit's divisor (|D| < 1e-8 -> 1); once per merge's weights, not
    per tensor."""
    divisor = float(torch.tensor(weight, dtype=torch.float32, device="cpu").sum())
    return 1.0 if abs(divisor) < 1e-8 else divisor


def combine(
    x: MergeInputs,
    sparse: Sequence[Sparse],
    weight: Sequence[float],
    *,
    normalize: bool,
    lam: float,
    consensus: bool,
) -> torch.Tensor:
    """merged = base + lambda * sum_i m_i w_i s_i sparse_i / D, written into ``x.output()``."""
    out = x.output()
    base = x.flat_base()
    n = out.numel()
    active = [(i, sp) for i, sp in enumerate(sparse) if not sp.zero]
    if not consensus:
        scales = [1.0 if sp.scale is None else sp.scale for sp in sparse]
        factors = linear_coefficients(weight, scales, normalize, lam)
        coef = [factors[i] for i, _ in active]
        ws = x.workspace
        bufs = [ws.buf(f"gta.h{j}", min(n, x.chunk)) for j in range(len(active))]
        tmp = ws.buf("gta.tmp", min(n, x.chunk))
        acc = ws.buf("gta.acc", min(n, x.chunk)) if narrow(out) else None  # 16-bit: sum in float32
        for sl in chunks(n, x.chunk):
            m = sl.stop - sl.start
            o = out[sl] if acc is None else acc[:m].copy_(base[sl])
            if not active and acc is None:
                o.copy_(base[sl])
            for j, (_, sp) in enumerate(active):
                h = sp.fill(sl, bufs[j][:m], tmp[:m])
                if j == 0 and acc is None:
                    torch.add(base[sl], h, alpha=coef[0], out=o)
                else:
                    o.add_(h, alpha=coef[j])
            if acc is not None:
                out[sl].copy_(o)
        return x.result()
    ws = x.workspace
    size = min(n, x.chunk)
    dps = [ws.buf(f"gta.h{j}", size) for j in range(len(active))]
    tmp, s_buf, sign_buf, sel, num, den = (
        ws.buf(f"gta.{s}", size) for s in ("tmp", "S", "M", "sel", "num", "den")
    )
    ones = ws.ones(size)
    for sl in chunks(n, x.chunk):
        m = sl.stop - sl.start
        o = out[sl]
        if not active:
            o.copy_(base[sl])
            continue
        terms = []
        for j, (i, sp) in enumerate(active):
            dp = dps[j][:m]
            h = as_float32(sp.fill(sl, dp, tmp[:m]), dp)  # 16-bit task vectors: weighted in float32
            if sp.scale is not None:  # mergekit: (masked * scale) * weight, two roundings
                torch.mul(h, sp.scale, out=dp)
                dp.mul_(weight[i])
            else:
                torch.mul(h, weight[i], out=dp)
            terms.append((dp, 1.0, weight[i]))
        sign_consensus(
            terms, s_buf[:m], sign_buf[:m], sel[:m], num[:m], den[:m] if normalize else None, ones[:m]
        )
        q = num[:m]
        if normalize:
            d = den[:m]
            d.add_(torch.eq(d, 0, out=tmp[:m]))  # mergekit: divisor[divisor == 0] = 1
            q.div_(d)
        if lam != 1:
            q.mul_(lam)
        torch.add(base[sl], q, out=o)
    return x.result()


def sign_consensus(
    terms: Sequence[tuple[torch.Tensor, float, float]],
    s: torch.Tensor,
    sign: torch.Tensor,
    sel: torch.Tensor,
    num: torch.Tensor,
    den: torch.Tensor | None,
    ones: torch.Tensor,
) -> torch.Tensor:
    """TIES sign election over terms (t_i, c_i, v_i), into preallocated buffers:

        S = sum_i t_i,  M = +1 where S >= 0 else -1,  m_i = [t_i * M > 0]   (zeros never agree)
        num = sum_i c_i m_i t_i,  den = sum_i v_i m_i

    Sums run in mergekit's order (t_0 + t_1 + ...), so for <= 4 terms M is bit-identical to
    mergekit's ``get_mask(..., "sum")``, and with c_i = 1 num and den equal its masked sums exactly.
    """
    t0 = terms[0][0]
    if len(terms) == 1:
        total = t0
    else:
        total = torch.add(t0, terms[1][0], out=s)
        for t, _, _ in terms[2:]:
            total.add_(t)
    # copysign gives -1 for S = -0.0, which only occurs when every term is a zero: never selected.
    torch.copysign(ones, total, out=sign)
    for j, (t, c, v) in enumerate(terms):
        torch.mul(t, sign, out=sel)
        torch.gt(sel, 0, out=sel)
        if j == 0:
            torch.mul(t, sel, out=num)
            if c != 1:
                num.mul_(c)
            if den is not None:
                torch.mul(sel, v, out=den)
        else:
            num.addcmul_(t, sel, value=c)
            if den is not None:
                den.add_(sel, alpha=v)
    return num
