"""slerp: spherical interpolation between the base and one expert (Shoemake, 1985)."""

from __future__ import annotations

import math

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.kernels import as_float32, chunks, narrow, weighted_sum

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _stats(x: MergeInputs) -> tuple[float, float, float]:
    """|base|, |expert| and base . expert over the flattened tensor (genome-independent, cached)."""

    def compute() -> tuple[float, float, float]:
        b, d = x.flat_base(), x.delta(0)
        size = min(b.numel(), x.chunk)
        buf, b_buf = x.workspace.buf("slerp.e", size), x.workspace.buf("slerp.b", size if narrow(b) else 0)
        dots = []  # read back once: no device sync per chunk
        for sl in chunks(b.numel(), x.chunk):
            m = sl.stop - sl.start
            bs = as_float32(b[sl], b_buf[:m])
            e = torch.add(bs, d[sl], out=buf[:m])
            dots.append(torch.stack([torch.dot(bs, bs), torch.dot(e, e), torch.dot(bs, e)]))
        aa = bb = ab = 0.0
        for a_, b_, ab_ in torch.stack(dots).tolist() if dots else []:
            aa += a_
            bb += b_
            ab += ab_
        return math.sqrt(aa), math.sqrt(bb), ab

    return x.cached("slerp", compute)


def prepare(x: MergeInputs) -> None:
    _stats(x)


def coefficients(t: float, dot: float) -> tuple[float, float]:
    """mergekit's float32 slerp coefficients for base (a) and expert (b) given cos(theta) = dot."""
    t_ = torch.tensor(t, dtype=torch.float32, device="cpu")
    dot_ = torch.tensor(dot, dtype=torch.float32, device="cpu").clamp(-1, 1)
    linear = dot_.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot_))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    coef_b = torch.where(linear, t_, torch.sin(t_ * theta) / sin_theta)
    return float(coef_a), float(coef_b)


@implements("slerp", prepare=prepare)
def slerp(x: MergeInputs, t: float) -> torch.Tensor:
    """cos(theta) = base . theta_1 / (|base| |theta_1|) over the flattened tensor;
    merged = sin((1 - t) theta) / sin(theta) base + sin(t theta) / sin(theta) theta_1,
    and (1 - t) base + t theta_1 where |cos(theta)| > 0.9995.  t = 0 gives the base, t = 1 the expert."""
    na, nb, ab = _stats(x)
    na, nb = (na if na > EPS else 1.0), (nb if nb > EPS else 1.0)
    ca, cb = coefficients(t, ab / (na * nb))
    # ca base + cb (base + delta) = (ca + cb) base + cb delta
    weighted_sum(x.output(), x.flat_base(), ca + cb, [(x.delta(0), cb)], x.workspace)
    return x.result()
