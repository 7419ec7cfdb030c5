"""magmax: per element, the task-vector entry of largest magnitude, MagMax (Marczak et al., 2024)."""

from __future__ import annotations

import torch

from evomerge.merge import fused
from evomerge.merge.base import MergeInputs, floats, implements
from evomerge.merge.kernels import chunks


@implements("magmax")
def magmax(x: MergeInputs, weight: torch.Tensor, **shared: float) -> torch.Tensor:
    """MagMax. Per element j, the weighted task-vector entry of largest magnitude:

        t(j) = argmax_i |w_i delta_i[j]|   (ties: the later expert, as the paper's code and FusionBench)
        merged = base + lambda w_t(j) delta_t(j)[j]

    The paper's merge has w_i = 1 (and lambda 0.5 for independent fine-tunes). Any tensor shape;
    nothing is cached; chunk by chunk in float32, rounded once, or as one compiled pass in a Merger's
    large models (``fused.magmax``).
    """
    lam = shared["lambda"]
    w = floats(weight)
    if fused.applies_unkeyed(x):
        return fused.magmax(x, w, lam)
    base, out = x.flat_base(), x.output()
    for sl in chunks(out.numel(), x.chunk):
        best = x.delta(0)[sl].to(torch.float32) * w[0]
        for i in range(1, x.n_experts):
            cur = x.delta(i)[sl].to(torch.float32) * w[i]
            best = torch.where(cur.abs() >= best.abs(), cur, best)
        out[sl] = torch.add(base[sl].to(torch.float32), best, alpha=lam)
    return x.result()
