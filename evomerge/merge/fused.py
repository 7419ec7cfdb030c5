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

Under a Merger (a worker's cache) a tensor of ``KEPT_TABLE_MIN`` elements or more needs no first loop:
``l1_i`` does not depend on the genome beyond ``density_i``, and U lies on a 2^-16 grid, so a
:class:`KeptTable` of each expert's |delta| mass per grid point, built once per tensor and seed, gives
it for any density as a partial sum (``KEPT_TABLE_BYTES`` per expert and tensor, in host memory; the
plan counts them). A merge is then one pass.
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
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from evomerge.merge.base import MergeInputs
from evomerge.merge.sparsify import Band, Sparse, row_ranks
from evomerge.merge.streams import (
    INT32_INDEX_LIMIT,
    KeyedStream,
    half_bits_i32,
    half_uniform_i32,
    hash32_i32,
)
from evomerge.shapes import KEPT_TABLE_MIN

log = logging.getLogger(__name__)

MIN_NUMEL = 1 << 16  # a model needs a tensor this large for the kernels to be worth compiling
# One vector of floats; smaller tensors (and sizes 0 and 1, which dynamo specializes) go eager.
MIN_TENSOR = 16


def worth_compiling(largest: int) -> bool:
    """Whether a model whose largest tensor has ``largest`` elements should use the fused kernels."""
    return largest >= MIN_NUMEL


GRID = 1 << 16  # the keyed uniforms' grid points: U = j / GRID, j in [0, GRID)


def grid_limit(density: float) -> int:
    """The grid point below which an element is kept at ``density``: U = j / 2^16 < p (p in float32, as
    the eager path compares it) exactly when j < ceil(p 2^16) (p 2^16 is exact in float64), clamped to
    [0, 2^16]."""
    return min(GRID, max(0, math.ceil(float(np.float32(density)) * GRID)))


def _keeps(n: int, keys: torch.Tensor, limit: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Each of the ``k`` experts' keep masks over elements [0, n): experts 2m and 2m + 1 read the two
    halves of pair m's hash (keys[0, m], keys[1, m], int32), so the loop hashes once per element and
    pair, in 32-bit arithmetic (the eager path's values: ``hash32_i32``), and compares the grid point
    with the expert's ``grid_limit`` (int32, ``limit``) without converting it to a float."""
    index = torch.arange(n, dtype=torch.int32, device=keys.device)
    keep = []
    for m in range((k + 1) // 2):
        h = hash32_i32(index, keys[0, m], keys[1, m])
        for half in range(min(2, k - 2 * m)):
            keep.append(half_bits_i32(h, half) < limit[2 * m + half])
    return keep


def _della_keeps(
    n: int, keys: torch.Tensor, ranks: torch.Tensor, f: torch.Tensor, k: int
) -> list[torch.Tensor]:
    """DELLA's keep masks: U_i < p_i with mergekit's probability, op for op in float32,
    p_i = (density_i - epsilon_i) + (rank_i / (cols - 1)) * 2 * epsilon_i, rank_i the 0-based rank of
    |delta_i| in its row (``ranks``: (ceil(K/2), n) int32, experts 2m and 2m + 1 in the low and high 16
    bits of row m, as Inductor vectorizes int32 loads and not int16 ones); f holds density - epsilon
    (K), epsilon (K), then cols - 1. Uniforms as in ``_keeps``."""
    index = torch.arange(n, dtype=torch.int32, device=keys.device)
    cm1 = f[2 * k]
    keep = []
    for m in range((k + 1) // 2):
        h = hash32_i32(index, keys[0, m], keys[1, m])
        for half in range(min(2, k - 2 * m)):
            i = 2 * m + half
            rank = ranks[m] & 0xFFFF if half == 0 else ranks[m] >> 16
            p = f[i] + rank.to(torch.float32) / cm1 * 2.0 * f[k + i]
            keep.append(half_uniform_i32(h, half) < p)
    return keep


def _masks(
    n: int, keys: torch.Tensor, masks: torch.Tensor, k: int, ranks: torch.Tensor | None
) -> list[torch.Tensor]:
    """The keep masks from their parameters ``masks``: dare's grid limits (int32, K), or della's (given
    ``ranks``) density - epsilon, epsilon and cols - 1 (float32, 2K + 1)."""
    if ranks is None:
        return _keeps(n, keys, masks, k)
    return _della_keeps(n, keys, ranks, masks, k)


def _kept_l1(
    deltas: torch.Tensor, keys: torch.Tensor, masks: torch.Tensor, ranks: torch.Tensor | None = None
) -> torch.Tensor:
    """sum |delta_i| over each expert's kept elements: deltas (K, n), pair keys (2, ceil(K/2)), the
    masks' parameters (``_masks``)."""
    k, n = deltas.shape
    keep = _masks(n, keys, masks, k, ranks)
    # 16-bit task vectors are summed in float32 (a no-op for float32 ones)
    return torch.stack([torch.where(keep[i], deltas[i].abs().to(torch.float32), 0.0).sum() for i in range(k)])


def _elect(t: list[torch.Tensor], weight: torch.Tensor, normalize: bool) -> torch.Tensor:
    """TIES sign election over the weighted terms t_i, as ``generalized.sign_consensus``: the sum of the
    terms that agree with the sign of their total, divided (``normalize``) by the sum of their weights.
    The expert loop is unrolled (K is static), so sums run in expert order as on the eager path."""
    k = len(t)
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
    return num


def _consensus(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    keys: torch.Tensor,
    masks: torch.Tensor,
    f: torch.Tensor,
    normalize: bool,
    ranks: torch.Tensor | None = None,
) -> None:
    """dare_ties / della: TIES sign election over the masked (``_masks``), rescaled, weighted task
    vectors; f holds scale and weight (K each), then lambda."""
    k, n = deltas.shape
    keep = _masks(n, keys, masks, k, ranks)
    scale, weight, lam = f[:k], f[k : 2 * k], f[2 * k]
    # mergekit: (masked * scale) * weight
    t = [torch.where(keep[i], deltas[i], 0.0) * scale[i] * weight[i] for i in range(k)]
    out.copy_(base + _elect(t, weight, normalize) * lam)


def _linear(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    keys: torch.Tensor,
    masks: torch.Tensor,
    coef: torch.Tensor,
    ranks: torch.Tensor | None = None,
) -> None:
    """dare_linear / della_linear: base + sum_i keep_i * delta_i * coef_i (keep_i from ``_masks``)."""
    k, n = deltas.shape
    keep = _masks(n, keys, masks, k, ranks)
    acc = base
    for i in range(k):
        acc = acc + torch.where(keep[i], deltas[i], 0.0) * coef[i]
    out.copy_(acc)


def _band_terms(deltas: torch.Tensor, f: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Each expert's kept, rescaled, weighted task vector under a magnitude band: keep lo_i < |d_i| <=
    hi_i (``sparsify.Band``'s hardshrink rule); f holds lo, hi, scale and weight (K each). A dense
    expert has lo = -1, one with nothing kept lo = inf; no upper bound is hi = inf."""
    out = []
    for i in range(k):
        d = deltas[i].to(torch.float32)
        a = d.abs()
        keep = (a > f[i]) & (a <= f[k + i])
        out.append(torch.where(keep, d, 0.0) * f[2 * k + i] * f[3 * k + i])  # mergekit: (masked * scale) * w
    return out


def _band_consensus(
    out: torch.Tensor, base: torch.Tensor, deltas: torch.Tensor, f: torch.Tensor, normalize: bool
) -> None:
    """ties, breadcrumbs_ties: the magnitude bands, then TIES sign election (f: lo, hi, scale, weight,
    then lambda)."""
    k, n = deltas.shape
    t = _band_terms(deltas, f, k)
    out.copy_(base + _elect(t, f[3 * k : 4 * k], normalize) * f[4 * k])


def _band_linear(out: torch.Tensor, base: torch.Tensor, deltas: torch.Tensor, f: torch.Tensor) -> None:
    """breadcrumbs (and magnitude-trimmed task arithmetic without consensus): base + sum_i coef_i
    band_i(delta_i); f holds lo, hi, 1 (K each) and coef (K)."""
    k, n = deltas.shape
    t = _band_terms(deltas, f, k)
    acc = base
    for i in range(k):
        acc = acc + t[i]
    out.copy_(acc)


def _magmax(out: torch.Tensor, base: torch.Tensor, deltas: torch.Tensor, f: torch.Tensor) -> None:
    """magmax: base + lambda * the weighted task-vector entry of largest magnitude (ties: the later
    expert); f holds weight (K), then lambda."""
    k, n = deltas.shape
    best = deltas[0].to(torch.float32) * f[0]
    for i in range(1, k):
        cur = deltas[i].to(torch.float32) * f[i]
        best = torch.where(cur.abs() >= best.abs(), cur, best)
    out.copy_(base.to(torch.float32) + best * f[k])


def _variance64(deltas: torch.Tensor, k: int) -> torch.Tensor:
    """The population variance across the K task vectors, in float64, two passes, rounded to float32
    (``sce._variance``'s operations)."""
    d = [deltas[i].to(torch.float64) for i in range(k)]
    mean = d[0]
    for i in range(1, k):
        mean = mean + d[i]
    mean = mean / k
    acc = (d[0] - mean) * (d[0] - mean)
    for i in range(1, k):
        acc = acc + (d[i] - mean) * (d[i] - mean)
    return (acc / k).to(torch.float32)


def _sce_selected(deltas: torch.Tensor, thr: torch.Tensor, k: int) -> list[torch.Tensor]:
    """sce's selection v_i = [var >= thr] delta_i in float32."""
    keep = _variance64(deltas, k) >= thr
    return [torch.where(keep, deltas[i].to(torch.float32), 0.0) for i in range(k)]


def _sce_energy(deltas: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """sum v_i^2 per expert, in float64 (f: the variance threshold)."""
    k, n = deltas.shape
    v = _sce_selected(deltas, f[0], k)
    return torch.stack([(v[i].to(torch.float64) * v[i].to(torch.float64)).sum() for i in range(k)])


def _sce_merge(out: torch.Tensor, base: torch.Tensor, deltas: torch.Tensor, f: torch.Tensor) -> None:
    """sce's erase and merge (``sce.sce``): m_i = [sign(v_i) = sign(sum_j v_j)], base + sum_i c_i m_i v_i
    / max(sum_i c_i m_i, 1e-6); f holds the threshold, then c (K)."""
    k, n = deltas.shape
    v = _sce_selected(deltas, f[0], k)
    total = v[0]
    for i in range(1, k):
        total = total + v[i]
    sign = torch.where(total >= 0, 1.0, -1.0)
    agree = [v[i] * sign > 0 for i in range(k)]
    num = torch.where(agree[0], v[0] * f[1], 0.0)
    den = torch.where(agree[0], f[1], 0.0)
    for i in range(1, k):
        num = num + torch.where(agree[i], v[i] * f[1 + i], 0.0)
        den = den + torch.where(agree[i], f[1 + i], 0.0)
    out.copy_(base + num / torch.clamp(den, min=1e-6))


def _dynamic(*tensors: torch.Tensor) -> None:
    """Compile once for every tensor length: the last dimension is dynamic, the expert count static.
    Marked where the kernels are first compiled (``_smoke``); a merge's calls need no marks, as the
    compiled entries' sizes are symbolic (``dynamic=True``; marking fresh views cost a merge 2-3%)."""
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
            for f in (
                _kept_l1,
                _consensus,
                _linear,
                _band_consensus,
                _band_linear,
                _magmax,
                _sce_energy,
                _sce_merge,
            )
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
    limits = torch.tensor([grid_limit(0.3), grid_limit(0.7)], dtype=torch.int32, device=device)
    assert torch.allclose(
        kernels["_kept_l1"](deltas, keys, limits), _kept_l1(deltas, keys, limits), rtol=1e-5
    )
    f = torch.tensor([1.1, 0.9, 0.6, 0.4, 1.0], device=device)
    ranks = torch.randperm(n, generator=g).remainder(1000).to(torch.int32).mul(65537).view(1, n).to(device)
    _dynamic(ranks)
    della = torch.tensor([0.3, 0.5, 0.1, 0.2, 999.0], device=device)
    assert torch.allclose(
        kernels["_kept_l1"](deltas, keys, della, ranks), _kept_l1(deltas, keys, della, ranks), rtol=1e-5
    )
    for masks, r in ((limits, None), (della, ranks)):
        for normalize in (False, True):
            a, b = torch.empty(n, device=device), torch.empty(n, device=device)
            _dynamic(a)
            kernels["_consensus"](a, base, deltas, keys, masks, f, normalize, r)
            _consensus(b, base, deltas, keys, masks, f, normalize, r)
            assert torch.allclose(a, b, atol=1e-6)
        a, b = torch.empty(n, device=device), torch.empty(n, device=device)
        _dynamic(a)
        kernels["_linear"](a, base, deltas, keys, masks, f[:2], r)
        _linear(b, base, deltas, keys, masks, f[:2], r)
        assert torch.allclose(a, b, atol=1e-6)
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    _dynamic(a)
    kernels["_magmax"](a, base, deltas, f[:3])
    _magmax(b, base, deltas, f[:3])
    assert torch.allclose(a, b, atol=1e-6)
    sce = torch.tensor([0.4, 0.7, 0.3], device=device)
    assert torch.allclose(kernels["_sce_energy"](deltas, sce), _sce_energy(deltas, sce), rtol=1e-9)
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    _dynamic(a)
    kernels["_sce_merge"](a, base, deltas, sce)
    _sce_merge(b, base, deltas, sce)
    assert torch.allclose(a, b, atol=1e-6)
    bands = torch.tensor([0.5, -1.0, 2.0, float("inf"), 1.0, 1.0, 0.6, 0.4, 1.1], device=device)
    for normalize in (False, True):
        a, b = torch.empty(n, device=device), torch.empty(n, device=device)
        _dynamic(a)
        kernels["_band_consensus"](a, base, deltas, bands, normalize)
        _band_consensus(b, base, deltas, bands, normalize)
        assert torch.equal(a, b)
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    _dynamic(a)
    kernels["_band_linear"](a, base, deltas, bands[:8])
    _band_linear(b, base, deltas, bands[:8])
    assert torch.allclose(a, b, atol=1e-6)


def applies(x: MergeInputs) -> bool:
    """Whether the kernels run this tensor: a keyed stream, a tensor of a large enough model (``x.fuse``;
    unset: this tensor large enough alone) with fewer than 2^31 elements (the kernels index in int32),
    kernels that compile for its device type."""
    if not isinstance(x.stream, KeyedStream) or not MIN_TENSOR <= x.numel < INT32_INDEX_LIMIT:
        return False
    large = x.fuse if x.fuse is not None else worth_compiling(x.numel)
    return large and kernels_for(x.device) is not None


def _operands(x: MergeInputs) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The kernels compiled for the tensor's device, its task vectors (K, n) and base (n)."""
    kernels = kernels_for(x.device)
    assert kernels is not None
    return kernels, x.deltas.reshape(x.n_experts, -1), x.flat_base()


def _prepared(x: MergeInputs) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_operands`` and the tensor's pair keys (on its device)."""
    kernels, deltas, base = _operands(x)
    stream = x.stream
    assert isinstance(stream, KeyedStream)
    keys = x.cached(
        ("fused.keys", stream.seed, x.device),
        lambda: stream.pair_keys(x.name, x.n_experts, x.device, torch.int32),
    )
    return kernels, deltas, base, keys


def _values(x: MergeInputs, values: list[float]) -> torch.Tensor:
    """A kernel's float parameters as a float32 vector on the tensor's device."""
    return torch.tensor(values, dtype=torch.float32, device=x.device)


def _mask_values(x: MergeInputs, masks: list[float], ranks: torch.Tensor | None) -> torch.Tensor:
    """The masks' parameters for the kernels (``_masks``): dare's densities as grid limits (int32),
    della's (given ``ranks``) as float32. The same for every tensor of a layer group in a merge, so
    made once (the kernels never write them)."""
    return _mask_tensor(tuple(masks), ranks is None, x.device)


@functools.lru_cache(maxsize=256)
def _mask_tensor(masks: tuple[float, ...], dare: bool, device: torch.device) -> torch.Tensor:
    if dare:
        return torch.tensor([grid_limit(p) for p in masks], dtype=torch.int32, device=device)
    return torch.tensor(masks, dtype=torch.float32, device=device)


def kept_l1(x: MergeInputs, masks: list[float], ranks: torch.Tensor | None = None) -> list[float]:
    """sum |delta_i| over each expert's kept elements (what the rescaling divides by), for dare's
    densities (``masks``) or della's mask parameters and ``ranks`` (``della_masks``): for dare a lookup
    in the tensor's :class:`KeptTable` under a Merger for tensors of ``KEPT_TABLE_MIN`` elements or
    more, otherwise a compiled pass over the task vectors."""
    if ranks is None and x.persistent and x.numel >= KEPT_TABLE_MIN:
        stream = x.stream
        assert isinstance(stream, KeyedStream)
        return x.cached(("fused.kept_table", stream.seed), lambda: KeptTable.build(x)).kept_l1(masks)
    kernels, deltas, _, keys = _prepared(x)
    return kernels["_kept_l1"](deltas, keys, _mask_values(x, masks, ranks), ranks).tolist()


DELLA_MAX_COLS = 1 << 15  # della's cached ranks take 16 bits: rows of at most this many entries


def applies_della(x: MergeInputs) -> bool:
    """Whether della's masks run in the kernels: ``applies``, and rows (the last dimension of a matrix,
    a vector whole) of 2 to ``DELLA_MAX_COLS`` entries; other tensors draw their masks eagerly."""
    dims = x.base.dim()
    return dims in (1, 2) and 2 <= x.base.shape[-1] <= DELLA_MAX_COLS and applies(x)


def della_masks(
    x: MergeInputs, density: list[float], epsilon: list[float]
) -> tuple[list[float], torch.Tensor]:
    """della's mask parameters for the kernels (density - epsilon and epsilon per expert, then cols - 1;
    an expert at density >= 1 keeps everything, at <= 0 nothing, as ``sparsify.della_magprune``) and
    the ranks of each |delta_i| in its row, 0-based, two experts' per int32 (``_della_keeps``):
    genome-independent, computed once per tensor and worker (torch's argsort, as the eager path) and
    cached (half a float32 model per expert)."""
    low, eps = [], []
    for p, e in zip(density, epsilon, strict=True):
        full, empty = p >= 1, p <= 0
        low.append(2.0 if full else -1.0 if empty else p - e)
        eps.append(0.0 if full or empty else e)
    cols = x.base.shape[-1]

    def ranks() -> torch.Tensor:
        out = torch.zeros((x.n_experts + 1) // 2, x.numel, dtype=torch.int32, device=x.device)
        rows = x.numel // cols
        block = max(1, x.chunk // cols)
        starts = range(0, rows, block)
        for i in range(x.n_experts):
            d = x.delta(i).view(rows, cols)
            for r0, r in zip(starts, row_ranks(d, starts, block), strict=True):
                part = out[i // 2, r0 * cols : (r0 + r.shape[0]) * cols]
                part.add_(r.view(-1).to(torch.int32) << (16 * (i % 2)))
        return out

    cached = x.cached("fused.della_ranks", ranks)
    _dynamic(cached)
    return [*low, *eps, float(cols - 1)], cached


BLOCK = 256  # grid points per partial sum of KeptTable.blocks
TABLE_CHUNK = 1 << 22  # elements hashed at a time while a table is built


class KeptTable:
    """Each expert's |delta| mass at each point of the keyed uniforms' grid, for one tensor and seed:
    ``mass[i, j]`` = sum |delta_i| over the elements whose U_i is j / 2^16 (float64 sums, kept as
    float32), and ``blocks[i, b]`` = sum of mass[i, :256 b] in float64. Element e is kept at density p
    when U_i(e) < p, i.e. j < ceil(p 2^16) with p in float32 as the kernels compare it, so the kept l1
    is blocks[i, m // 256] + sum(mass[i, 256 (m // 256) : m]): at most 255 additions."""

    def __init__(self, mass: np.ndarray, blocks: np.ndarray) -> None:
        self.mass, self.blocks = mass, blocks

    @classmethod
    def build(cls, x: MergeInputs) -> KeptTable:
        """One pass over tensor ``x``'s task vectors, hashing as the kernels do (on their device)."""
        stream = x.stream
        assert isinstance(stream, KeyedStream)
        k, n = x.n_experts, x.numel
        deltas = x.deltas.reshape(k, -1)
        keys = stream.pair_keys(x.name, k, "cpu", torch.int32).tolist()
        mass = torch.zeros(k, GRID, dtype=torch.float64, device=x.device)
        for start in range(0, n, TABLE_CHUNK):
            stop = min(n, start + TABLE_CHUNK)
            index = torch.arange(start, stop, dtype=torch.int32, device=x.device)
            for m in range((k + 1) // 2):
                h = hash32_i32(index, keys[0][m], keys[1][m])
                for half in range(min(2, k - 2 * m)):
                    i = 2 * m + half
                    grid = half_bits_i32(h, half)
                    weights = deltas[i, start:stop].abs().to(torch.float64)
                    mass[i] += torch.bincount(grid, weights=weights, minlength=GRID)
        mass = mass.cpu()
        blocks = torch.zeros(k, GRID // BLOCK + 1, dtype=torch.float64, device="cpu")
        blocks[:, 1:] = mass.view(k, -1, BLOCK).sum(dim=2).cumsum(dim=1)
        # numpy: a lookup is a few small sums, where numpy's call overhead is a fraction of torch's
        return cls(mass.to(torch.float32).numpy(), blocks.numpy())

    @property
    def nbytes(self) -> int:
        return self.mass.nbytes + self.blocks.nbytes

    def kept_l1(self, density: list[float]) -> list[float]:
        out = []
        for i, p in enumerate(density):
            m = grid_limit(p)
            b = m // BLOCK
            out.append(float(self.blocks[i, b]) + float(self.mass[i, b * BLOCK : m].sum(dtype=np.float64)))
        return out


def consensus(
    x: MergeInputs,
    masks: list[float],
    scale: list[float],
    weight: list[float],
    lam: float,
    normalize: bool,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """dare_ties (``masks``: densities) or della (``della_masks``) on tensor ``x``: masked, rescaled,
    weighted task vectors, TIES sign election."""
    kernels, deltas, base, keys = _prepared(x)
    out = x.output()
    f = _values(x, [*scale, *weight, lam])
    kernels["_consensus"](out, base, deltas, keys, _mask_values(x, masks, ranks), f, normalize, ranks)
    return x.result()


def linear(
    x: MergeInputs, masks: list[float], coef: list[float], ranks: torch.Tensor | None = None
) -> torch.Tensor:
    """dare_linear or della_linear on tensor ``x``: base + sum_i coef_i * masked task vector i."""
    kernels, deltas, base, keys = _prepared(x)
    out = x.output()
    kernels["_linear"](out, base, deltas, keys, _mask_values(x, masks, ranks), _values(x, coef), ranks)
    return x.result()


def applies_unkeyed(x: MergeInputs) -> bool:
    """Whether the kernels that need no keyed stream run this tensor (the magnitude bands of ties,
    breadcrumbs and breadcrumbs_ties; magmax; sce): a tensor of a large enough model (``x.fuse``) held
    by a Merger that merges it repeatedly (a search), kernels that compile for its device type."""
    return (
        x.persistent
        and bool(x.fuse)
        and MIN_TENSOR <= x.numel < INT32_INDEX_LIMIT
        and kernels_for(x.device) is not None
    )


def _limits(sparse: Sequence[Sparse]) -> tuple[list[float], list[float]]:
    """Each expert's band (lo, hi) for ``_band_terms``: a dense one keeps everything, a zero one nothing."""
    lo, hi = [], []
    for sp in sparse:
        if sp.dense or sp.zero:
            lo.append(-1.0 if sp.dense else math.inf)
            hi.append(math.inf)
        else:
            assert isinstance(sp, Band)
            lo.append(float(sp.lo))
            hi.append(math.inf if sp.hi is None else float(sp.hi))
    return lo, hi


def band_consensus(
    x: MergeInputs, sparse: Sequence[Sparse], weight: Sequence[float], lam: float, normalize: bool
) -> torch.Tensor:
    """``generalized.combine`` with consensus for magnitude-trimmed task vectors (``Band``, ``Dense``,
    ``Zero``) as one compiled pass (ties, breadcrumbs_ties)."""
    lo, hi = _limits(sparse)
    scale = [1.0 if sp.scale is None else sp.scale for sp in sparse]
    f = _values(x, [*lo, *hi, *scale, *weight, lam])
    return _bands(x, sparse, lambda fn, o, b, d: fn(o, b, d, f, normalize), "_band_consensus")


def band_linear(x: MergeInputs, sparse: Sequence[Sparse], coef: Sequence[float]) -> torch.Tensor:
    """``generalized.combine`` without consensus for magnitude-trimmed task vectors: base + sum_i
    coef_i band_i (breadcrumbs), one compiled pass."""
    lo, hi = _limits(sparse)
    f = _values(x, [*lo, *hi, *([1.0] * len(sparse)), *coef])
    return _bands(x, sparse, lambda fn, o, b, d: fn(o, b, d, f), "_band_linear")


def _bands(x: MergeInputs, sparse: Sequence[Sparse], call: Any, name: str) -> torch.Tensor:
    """Run kernel ``name`` over the tensor; the few elements a band drops by index (values tied at a
    threshold: ``Band.drop``) are then recomputed by the same function, eagerly, with those task-vector
    entries zeroed (a zero entry never agrees in the sign election and adds nothing)."""
    kernels, deltas, base = _operands(x)
    out = x.output()
    call(kernels[name], out, base, deltas)
    drops = [(i, sp.drop) for i, sp in enumerate(sparse) if isinstance(sp, Band) and sp.drop is not None]
    if drops:
        where = torch.unique(torch.cat([d for _, d in drops]))
        sub = deltas[:, where].clone()
        for i, d in drops:
            sub[i, torch.searchsorted(where, d)] = 0
        fixed = torch.empty(where.numel(), dtype=out.dtype, device=out.device)
        call(globals()[name], fixed, base[where], sub)
        out[where] = fixed
    return x.result()


def magmax(x: MergeInputs, weight: Sequence[float], lam: float) -> torch.Tensor:
    """magmax on tensor ``x`` as one compiled pass."""
    kernels, deltas, base = _operands(x)
    out = x.output()
    kernels["_magmax"](out, base, deltas, _values(x, [*weight, lam]))
    return x.result()


def sce_energy(x: MergeInputs, thr: float | None, drop: torch.Tensor | None) -> list[float]:
    """sce's sum v_i^2 per expert for threshold ``thr`` (None: every element) less the elements
    ``drop`` (tied at the threshold, left out of the top k), one compiled pass."""
    kernels, deltas, _ = _operands(x)
    energy = kernels["_sce_energy"](deltas, _values(x, [-math.inf if thr is None else thr]))
    if drop is not None:
        dropped = deltas[:, drop].to(torch.float64)
        energy = energy - (dropped * dropped).sum(dim=1)
    return energy.tolist()


def sce_merge(
    x: MergeInputs, thr: float | None, drop: torch.Tensor | None, coef: Sequence[float]
) -> torch.Tensor:
    """sce's erase and merge with coefficients ``coef``, one compiled pass; the elements ``drop`` select
    no expert, so they keep the base."""
    kernels, deltas, base = _operands(x)
    out = x.output()
    kernels["_sce_merge"](out, base, deltas, _values(x, [-math.inf if thr is None else thr, *coef]))
    if drop is not None:
        out[drop] = base[drop] + 0.0
    return x.result()
