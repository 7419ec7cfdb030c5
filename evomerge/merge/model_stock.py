"""model_stock: interpolate between the base and the experts' average by their angle (Jang et al., 2024)."""

from __future__ import annotations

import itertools

import torch

from evomerge.merge.base import MergeInputs, implements
from evomerge.merge.kernels import narrow, weighted_sum


def _ratio(x: MergeInputs, filter_wise: bool) -> torch.Tensor:
    """t: a float32 scalar, or one per row shaped (..., 1) when filter_wise (genome-independent, cached)."""

    def compute() -> torch.Tensor:
        # mergekit's float32 ops on the same task vectors, so t is bit-identical (one-time cost)
        k = x.n_experts
        deltas = x.deltas.to(torch.float32)  # 16-bit task vectors: a one-time float32 copy
        ds = (
            [d.unsqueeze(0) if d.dim() == 1 else d for d in deltas]
            if filter_wise
            else list(deltas.reshape(k, -1))
        )
        norms = [torch.norm(d, dim=-1) for d in ds]
        cos = [
            ((ds[i] * ds[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
            for i, j in itertools.combinations(range(k), 2)
        ]
        cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
        denominator = 1 + (k - 1) * cos_theta
        singular = denominator.abs() < 1e-6
        safe = torch.where(singular, torch.ones_like(denominator), denominator)
        return torch.where(singular, torch.zeros_like(cos_theta), (k * cos_theta) / safe)

    return x.cached(("model_stock", filter_wise), compute)


def prepare(x: MergeInputs) -> None:
    _ratio(x, False)


@implements("model_stock", prepare=prepare)
def model_stock(x: MergeInputs, filter_wise: bool) -> torch.Tensor:
    """cos = mean over expert pairs of cos(delta_i, delta_j) (per row when filter_wise, else over the
    flattened tensor);  t = K cos / (1 + (K - 1) cos), 0 where |1 + (K - 1) cos| < 1e-6;
    merged = t mean_i theta_i + (1 - t) base = base + t/K sum_i delta_i."""
    t = _ratio(x, filter_wise)
    k = x.n_experts
    if t.numel() == 1 and not filter_wise:
        c = float(t.reshape(())) / k
        weighted_sum(x.output(), x.flat_base(), 1.0, [(x.delta(i), c) for i in range(k)], x.workspace)
        return x.result()
    x.output()
    res = x.result()
    acc = x.base.to(torch.float32, copy=True) if narrow(res) else res.copy_(x.base)  # summed in float32
    view = acc.unsqueeze(0) if acc.dim() == 1 else acc
    tk = t / k
    for d in x.deltas:
        view.addcmul_(d.unsqueeze(0) if d.dim() == 1 else d, tk)
    if acc is not res:
        res.copy_(acc)
    return res
