"""nuslerp: spherical interpolation between two experts' task vectors (or the experts themselves)."""

from __future__ import annotations

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.kernels import chunk_size, chunks, narrow, weighted_sum

EPS = 1e-8


def _cos(x: MergeInputs, row_wise: bool, flatten: bool) -> torch.Tensor:
    """cos(omega) between v_0 and v_1: a scalar (flatten) or one per slice along the interpolation axis,
    shaped to broadcast against the tensor (genome-independent, cached)."""

    def compute() -> torch.Tensor:
        # mergekit's float32 ops, so the cosine is bit-identical: over the flattened embedding its
        # float32 norm is ~0.2% off, and agreeing with mergekit means agreeing with that.
        v0, v1 = x.deltas[0].to(torch.float32), x.deltas[1].to(torch.float32)  # 16-bit: one-time copies
        if flatten:
            v0, v1 = v0.reshape(-1), v1.reshape(-1)
        elif row_wise:
            v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
        n0 = torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
        n1 = torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
        prod = v0 / n0
        if flatten:  # one full-size temporary: the second factor is formed chunk by chunk
            for sl in chunks(prod.numel(), chunk_size(prod.device)):
                prod[sl].mul_(v1[sl] / n1)
        else:
            prod.mul_(v1 / n1)
        cos = torch.sum(prod, dim=-1, keepdim=True).clamp(-1, 1)
        if flatten:
            return cos.reshape(())
        return cos.transpose(0, -1) if row_wise else cos

    return x.cached(("nuslerp", row_wise, flatten), compute)


def prepare(x: MergeInputs) -> None:
    _cos(x, False, True)


@implements("nuslerp", prepare=prepare)
def nuslerp(
    x: MergeInputs, weight: torch.Tensor, nuslerp_row_wise: bool, nuslerp_flatten: bool
) -> torch.Tensor:
    """t = w_1 / (w_0 + w_1) (0.5 when |w_0 + w_1| < 1e-6);  v_i = theta_i - base (the experts
    themselves when merged without a base);  omega the angle between v_0 and v_1 over the flattened
    tensor (nuslerp_flatten), else per row (per column with nuslerp_row_wise):
        merged = base + sin((1 - t) omega) / sin(omega) v_0 + sin(t omega) / sin(omega) v_1,
    and base + (1 - t) v_0 + t v_1 where v_0 and v_1 are colinear."""
    w0, w1 = (float(v) for v in weight)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    cos = _cos(x, nuslerp_row_wise, nuslerp_flatten)
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    out = x.output()
    if cos.dim() == 0:
        terms = [(x.delta(0), float(c0)), (x.delta(1), float(c1))]
        weighted_sum(out, x.flat_base(), 1.0, terms, x.workspace)
        return x.result()
    res = x.result()
    acc = x.base.to(torch.float32, copy=True) if narrow(res) else res.copy_(x.base)  # summed in float32
    acc.addcmul_(x.deltas[0], c0)
    acc.addcmul_(x.deltas[1], c1)
    if acc is not res:
        res.copy_(acc)
    return res
