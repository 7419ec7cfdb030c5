"""Fused kernels for the random-mask methods (dare_ties, dare_linear) under a keyed stream.

With a ``KeyedStream`` an element's uniform is a hash of its index (one hash for every two experts),
so the mask need not be drawn, stored and read back: one compiled loop (``torch.compile``:
Inductor's C++ backend on CPUs, its Triton backend on GPUs) hashes, masks, weights, elects signs and
writes the output, and a first loop computes the l1 norms the rescaling needs. Per element of a
tensor with K experts:

    keep_i = U_i(index) < density_i
    l1_i   = sum |delta_i| over kept elements          (rescale: s_i = |delta_i|_1 / l1_i)
    t_i    = keep_i * delta_i * s_i * w_i
    merged = base + lambda * sum_i m_i t_i / D         (``evomerge.merge.generalized``'s formula)

The results equal the eager path's (same masks; sums in another order, so within float32 rounding).
Compiling takes tens of seconds once per process and device type (Inductor caches the code on disk
for the next); where the kernels cannot be compiled for a device type (checked once per type, on a
small input against the eager functions), or with ``EVOMERGE_FUSED=0``, or in models whose largest
tensor has
under ``MIN_NUMEL`` elements (where the compile would cost more than it saves), the eager path runs
instead. In larger models every tensor of ``MIN_TENSOR`` elements or more runs fused: two kernel
calls cost less than the eager path's some thirty small ops (routing the 61 norm vectors of the
SmolLM2-shaped benchmark through the kernels took a dare_ties merge from 0.330 s to 0.304 s, median
of 8 alternating runs in one process).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from evomerge.merge.base import MergeInputs
from evomerge.merge.streams import INT32_INDEX_LIMIT, KeyedStream, half_uniform_i32, hash32_i32

log = logging.getLogger(__name__)

MIN_NUMEL = 1 << 16  # a model needs a tensor this large for the kernels to be worth compiling
# One vector of floats; smaller tensors (and sizes 0 and 1, which dynamo specializes) go eager.
MIN_TENSOR = 16


def worth_compiling(largest: int) -> bool:
    """Whether a model whose largest tensor has ``largest`` elements should use the fused kernels."""
    return largest >= MIN_NUMEL


def _keeps(n: int, keys: torch.Tensor, density: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Each of the ``k`` experts' keep masks over elements [0, n): experts 2m and 2m + 1 read the two
    halves of pair m's hash (keys[0, m], keys[1, m], int32), so the loop hashes once per element and
    pair, in 32-bit arithmetic (the eager path's values: ``hash32_i32``)."""
    index = torch.arange(n, dtype=torch.int32, device=keys.device)
    keep = []
    for m in range((k + 1) // 2):
        h = hash32_i32(index, keys[0, m], keys[1, m])
        for half in range(min(2, k - 2 * m)):
            keep.append(half_uniform_i32(h, half) < density[2 * m + half])
    return keep


def _kept_l1(deltas: torch.Tensor, keys: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """sum |delta_i| over each expert's kept elements: deltas (K, n), pair keys (2, ceil(K/2)),
    density (K,)."""
    k, n = deltas.shape
    keep = _keeps(n, keys, density, k)
    # 16-bit task vectors are summed in float32 (a no-op for float32 ones)
    return torch.stack([torch.where(keep[i], deltas[i].abs().to(torch.float32), 0.0).sum() for i in range(k)])


def _consensus(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    keys: torch.Tensor,
    f: torch.Tensor,
    normalize: bool,
) -> None:
    """TIES sign election over the masked, rescaled, weighted task vectors; f holds density, scale and
    weight (K each), then lambda. The expert loop is unrolled (K is static), so sums run in expert
    order as on the eager path."""
    k, n = deltas.shape
    keep = _keeps(n, keys, f, k)
    scale, weight, lam = f[k : 2 * k], f[2 * k : 3 * k], f[3 * k]
    # mergekit: (masked * scale) * weight
    t = [torch.where(keep[i], deltas[i], 0.0) * scale[i] * weight[i] for i in range(k)]
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
    out: torch.Tensor, base: torch.Tensor, deltas: torch.Tensor, keys: torch.Tensor, f: torch.Tensor
) -> None:
    """base + sum_i keep_i * delta_i * coef_i; f holds density, then coef (K each)."""
    k, n = deltas.shape
    keep = _keeps(n, keys, f, k)
    acc = base
    for i in range(k):
        acc = acc + torch.where(keep[i], deltas[i], 0.0) * f[k + i]
    out.copy_(acc)


def _dynamic(*tensors: torch.Tensor) -> None:
    """Compile once for every tensor length: the last dimension is dynamic, the expert count static."""
    for t in tensors:
        torch._dynamo.mark_dynamic(t, t.dim() - 1)


COMPILED_DEVICES = ("cpu", "cuda")  # device types whose Inductor backend the kernels are tried on


@functools.cache
def _compiled(device_type: str = "cpu") -> dict[str, Any] | None:
    """The kernels compiled for tensors on devices of ``device_type``, or None when this process
    cannot compile them there (logged once per device type): the eager path runs instead."""
    if os.environ.get("EVOMERGE_FUSED", "1") == "0" or device_type not in COMPILED_DEVICES:
        return None
    # One compiled entry per expert count, `normalize`, dtype and torch thread count (a process that
    # changes its thread count recompiles): dynamo's default limit of 8 entries per function is too low.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    try:
        kernels = {
            f.__name__: torch.compile(f, dynamic=True, fullgraph=True)
            for f in (_kept_l1, _consensus, _linear)
        }
        with torch.no_grad():  # as merges run: grad mode is part of the compiled entry's guards
            _smoke(kernels, device_type)
    except Exception as e:  # no C++ compiler / Triton, an unsupported platform: the eager path is exact too
        log.warning(
            "fused merge kernels unavailable on %s (%s: %s); using the eager path",
            device_type,
            type(e).__name__,
            e,
        )
        return None
    return kernels


def kernels_for(device: torch.device) -> dict[str, Any] | None:
    """The kernels compiled for ``device``'s type, or None (``_compiled()``, no argument, for the CPU)."""
    return _compiled() if device.type == "cpu" else _compiled(device.type)


def _smoke(kernels: dict[str, Any], device_type: str = "cpu") -> None:
    """Compile and check every kernel on a small input on a device of ``device_type`` against the
    eager functions."""
    device = torch.device(device_type)
    g = torch.Generator(device="cpu").manual_seed(0)
    n = MIN_NUMEL + 3
    base = torch.randn(n, generator=g, device="cpu").to(device)
    deltas = torch.randn(2, n, generator=g, device="cpu").to(device)
    _dynamic(base, deltas)
    keys = torch.tensor([[-7], [3]], dtype=torch.int32, device=device)  # keys of 2^31 and above are negative
    col = torch.tensor([0.3, 0.7], device=device)
    assert torch.allclose(kernels["_kept_l1"](deltas, keys, col), _kept_l1(deltas, keys, col), rtol=1e-5)
    f = torch.tensor([0.3, 0.7, 1.1, 0.9, 0.6, 0.4, 1.0], device=device)
    for normalize in (False, True):
        a, b = torch.empty(n, device=device), torch.empty(n, device=device)
        _dynamic(a)
        kernels["_consensus"](a, base, deltas, keys, f, normalize)
        _consensus(b, base, deltas, keys, f, normalize)
        assert torch.allclose(a, b, atol=1e-6)
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    _dynamic(a)
    kernels["_linear"](a, base, deltas, keys, f[:4])
    _linear(b, base, deltas, keys, f[:4])
    assert torch.allclose(a, b, atol=1e-6)


def applies(x: MergeInputs) -> bool:
    """Whether the kernels run this tensor: a keyed stream, a tensor of a large enough model (``x.fuse``;
    unset: this tensor large enough alone) with fewer than 2^31 elements (the kernels index in int32),
    kernels that compile for its device type."""
    if not isinstance(x.stream, KeyedStream) or not MIN_TENSOR <= x.numel < INT32_INDEX_LIMIT:
        return False
    large = x.fuse if x.fuse is not None else worth_compiling(x.numel)
    return large and kernels_for(x.device) is not None


def _prepared(x: MergeInputs) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels, this tensor's task vectors (K, n) and base (n) marked dynamic, and its pair keys
    (on the tensor's device)."""
    kernels = kernels_for(x.device)
    assert kernels is not None and isinstance(x.stream, KeyedStream)
    deltas = x.deltas.reshape(x.n_experts, -1)
    base = x.flat_base()
    _dynamic(deltas, base)
    stream = x.stream
    keys = x.cached(
        ("fused.keys", stream.seed, x.device),
        lambda: stream.pair_keys(x.name, x.n_experts, x.device, torch.int32),
    )
    return kernels, deltas, base, keys


def _values(x: MergeInputs, values: list[float]) -> torch.Tensor:
    """A kernel's float parameters as a float32 vector on the tensor's device."""
    return torch.tensor(values, dtype=torch.float32, device=x.device)


def kept_l1(x: MergeInputs, density: list[float]) -> list[float]:
    """sum |delta_i| over each expert's kept elements (what the rescaling divides by)."""
    kernels, deltas, _, keys = _prepared(x)
    return kernels["_kept_l1"](deltas, keys, _values(x, density)).tolist()


def consensus(
    x: MergeInputs,
    density: list[float],
    scale: list[float],
    weight: list[float],
    lam: float,
    normalize: bool,
) -> torch.Tensor:
    """dare_ties on tensor ``x``: masked, rescaled, weighted task vectors, TIES sign election."""
    kernels, deltas, base, keys = _prepared(x)
    out = x.output()
    _dynamic(out)
    kernels["_consensus"](out, base, deltas, keys, _values(x, [*density, *scale, *weight, lam]), normalize)
    return x.result()


def linear(x: MergeInputs, density: list[float], coef: list[float]) -> torch.Tensor:
    """dare_linear on tensor ``x``: base + sum_i coef_i * masked task vector i."""
    kernels, deltas, base, keys = _prepared(x)
    out = x.output()
    _dynamic(out)
    kernels["_linear"](out, base, deltas, keys, _values(x, [*density, *coef]))
    return x.result()
