"""Sparsification of one expert's task vector, as mergekit's ``sparsify`` does it, chunk by chunk.

Each function returns a ``Sparse``: what survives of delta_i, produced by ``fill(sl, buf, tmp)`` for a
slice of the flat tensor, and the l1 ``scale`` mergekit multiplies it by when ``rescale`` is on:
    scale = sum|delta_i| / sum|sparse(delta_i)|   (none when either is below 1e-7).

- ``magnitude``:           keep |d| >= the k-th largest |d|, k = max(1, int(density * n)).
- ``magnitude_outliers``:  drop the int(gamma * n) largest, then keep the int(density * n) largest left:
                           keep lo <= |d| <= hi for the two order statistics bounding those ranks.
- ``bernoulli``:           keep with probability density: U < density, U uniform (DARE).
- ``della_magprune``:      keep with probability p = density - epsilon + 2 epsilon (rank - 1)/(cols - 1),
                           rank of |d| within its row (1 = smallest) (DELLA).

Thresholds come from the tensor's ``OrderSketch`` (no sort per merge). Of the elements tied with a
threshold, as many survive as in mergekit, the first by index where mergekit's unstable argsort keeps
an arbitrary subset: the kept magnitudes, hence the rescale factors, are the same. Random masks use
the inputs' stream exactly as mergekit uses torch's generator, so equal seeds give equal masks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from evomerge.merge.base import MergeInputs
from evomerge.merge.kernels import STORE, as_float32, chunks, l1_float32
from evomerge.merge.orderstats import OrderSketch, Selection, below

EPS = 1e-7  # mergekit's rescaled_masked_tensor tolerance
# Up to STORE elements a drawn mask is kept applied, in float32, and l1 sums are one whole-tensor
# reduction as in mergekit; beyond (embeddings), masks are kept as bytes and sums taken by parts,
# which can round differently in the last bit.


class Sparse:
    """What survives of one task vector. ``dense``: all of it (``fill`` returns a view, no copy);
    ``zero``: nothing; otherwise ``fill`` writes the chunk into ``buf`` (``tmp`` is scratch)."""

    dense = False
    zero = False
    scale: float | None = None

    def fill(self, sl: slice, buf: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Dense(Sparse):
    dense = True

    def __init__(self, d: torch.Tensor) -> None:
        self.d = d

    def fill(self, sl: slice, buf: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        return self.d[sl]


class Zero(Sparse):
    zero = True

    def fill(self, sl: slice, buf: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        return buf.zero_()


class Band(Sparse):
    """Keep lo <= |d| (<= hi when hi is given), except the flat indices ``drop`` (sorted): one or two
    ``hardshrink`` per chunk, and zeroing of the dropped ones."""

    def __init__(
        self, d: torch.Tensor, lo: float, hi: float | None = None, drop: torch.Tensor | None = None
    ) -> None:
        self.d = d
        self.lo = below(lo)
        self.hi = hi
        self.drop = drop if drop is not None and drop.numel() else None

    def fill(self, sl: slice, buf: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        torch.hardshrink(as_float32(self.d[sl], buf), self.lo, out=buf)
        if self.hi is not None:
            buf.sub_(torch.hardshrink(buf, self.hi, out=tmp))
        if self.drop is not None:
            bounds = torch.tensor([sl.start, sl.stop], device=self.drop.device)
            a, b = torch.searchsorted(self.drop, bounds).tolist()
            if b > a:
                buf.index_fill_(0, self.drop[a:b] - sl.start, 0)
        return buf


def surplus(sel: Selection, first: int, last: int) -> torch.Tensor | None:
    """Of the values tied at ``sel`` (ranks sel.less .. sel.less + #equal - 1 in ascending order),
    mergekit's sort keeps those ranked within [first, last]; keep that many, the first by index, and
    return the indices of the others (None when all are kept)."""
    if sel.equal is None:
        return None
    keep = min(last, sel.less + sel.equal.numel() - 1) - max(first, sel.less) + 1
    return sel.equal[max(keep, 0) :] if keep < sel.equal.numel() else None


class Stored(Sparse):
    """A random mask drawn once per merge: the masked values themselves for tensors up to STORE
    elements, else the 0/1 mask as bytes (the masked values are recomputed on ``fill``)."""

    def __init__(self, d: torch.Tensor, masked: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        self.d = d
        self.masked = masked
        self.mask = mask

    def fill(self, sl: slice, buf: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        if self.masked is not None:
            return self.masked[sl]
        assert self.mask is not None
        tmp.copy_(self.mask[sl])
        return torch.mul(self.d[sl], tmp, out=buf)


def _rescale(x: MergeInputs, i: int, sp: Sparse, after: torch.Tensor | None = None) -> Sparse:
    """Set mergekit's l1 rescale factor on ``sp``; ``after`` (sum |kept|) is computed when not given."""
    if sp.dense or sp.zero:
        return sp
    before = x.abs_sum(i)
    if after is None:
        n = x.numel
        size = min(n, STORE)
        whole = x.workspace.buf("whole", size)
        tmp = x.workspace.buf("sparsify.tmp", min(n, x.chunk))
        parts = []
        for sl in chunks(n, size):
            for c in chunks(sl.stop - sl.start, x.chunk):
                sp.fill(slice(sl.start + c.start, sl.start + c.stop), whole[c], tmp[: c.stop - c.start])
            parts.append(l1(whole[: sl.stop - sl.start]))
        after = _total(parts)
    sp.scale = rescale_factor(float(before), float(after))
    return sp


def rescale_factor(before: float, after: float) -> float | None:
    """mergekit's l1 rescale factor sum |d| / sum |kept d|, divided in float32 as mergekit does; None
    (no rescaling) where either sum is below its tolerance."""
    if before < EPS or after < EPS:
        return None
    return float(np.float32(before) / np.float32(after))


def l1(t: torch.Tensor) -> torch.Tensor:
    """sum |t| in float32, reduced as mergekit's ``t.abs().sum()`` (``t`` is overwritten)."""
    return torch.abs(t, out=t).sum()


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    """One part is mergekit's exact reduction; several (tensors over STORE elements, summed by parts
    to bound memory) agree with it to float32 rounding."""
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def magnitude(x: MergeInputs, i: int, density: float, rescale: bool = False) -> Sparse:
    """TIES trimming: the k = max(1, int(density * n)) largest |delta_i|.

    Exactly k survive: of the values tied with the k-th largest, the first by index (mergekit's
    argsort keeps an arbitrary subset of the same size, so sums and rescaling agree)."""
    d = x.delta(i)
    n = d.numel()
    if density >= 1:
        return Dense(d)
    if density <= 0 or n == 0:
        return Zero()
    k = max(1, int(density * n))
    sel = x.magnitude_select(i, n - k)
    sp = Band(d, sel.value, drop=surplus(sel, n - k, n - 1))
    return _rescale(x, i, sp) if rescale else sp


def magnitude_outliers(x: MergeInputs, i: int, density: float, gamma: float, rescale: bool = False) -> Sparse:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest |delta_i| and the smallest, keeping
    int(density * n): ascending ranks [n - k - g, n - k - g + k), g = int(gamma * n), g shrinking
    when k + g > n. Ties at either end are resolved as in ``magnitude``."""
    d = x.delta(i)
    n = d.numel()
    if density >= 1:
        return Dense(d)
    target = int(density * n)
    if target <= 0:
        return Zero()
    top = int(gamma * n)
    first = max(0, n - target - top)
    last = first + target - 1
    lo = x.magnitude_select(i, first)
    hi = x.magnitude_select(i, last) if last < n - 1 else None
    drops = [surplus(lo, first, last)]
    if hi is not None and hi.value != lo.value:
        drops.append(surplus(hi, first, last))
    drop = [t for t in drops if t is not None]
    sp = Band(
        d, lo.value, hi.value if hi is not None else None, torch.cat(drop).sort().values if drop else None
    )
    return _rescale(x, i, sp) if rescale else sp


def _store(x: MergeInputs, i: int, slot_masked: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Where a random sparsifier keeps its draw until ``combine`` reads it: the masked values for
    tensors up to STORE elements, else the 0/1 mask as bytes (a quarter of the memory)."""
    n = x.numel
    if n <= STORE:
        return x.workspace.buf(f"{slot_masked}{i}", n), None
    return None, x.workspace.buf(f"sparsify.mask{i}", n, torch.uint8)


def bernoulli(x: MergeInputs, i: int, density: float, rescale: bool = False) -> Sparse:
    """DARE: keep each element with probability ``density`` (mergekit's ``torch.bernoulli`` draws)."""
    d = x.delta(i)
    n = d.numel()
    if density >= 1:
        return Dense(d)
    masked_store, mask_store = _store(x, i, "sparsify.masked")
    u_buf = x.workspace.buf("sparsify.u", min(n, x.chunk))
    m_buf = x.workspace.buf("sparsify.m", min(n, x.chunk))
    parts = []
    for sl in chunks(n, x.chunk):
        m = sl.stop - sl.start
        u = x.stream.uniform_(u_buf[:m], (x.name, i), sl.start)
        mask = torch.lt(u, density, out=m_buf[:m])  # float 0/1, U < p in float32 as torch.bernoulli
        out = masked_store[sl] if masked_store is not None else u_buf[:m]
        masked = torch.mul(d[sl], mask, out=out)
        if mask_store is not None:
            mask_store[sl].copy_(mask)
            if rescale:
                parts.append(l1(masked))
    return _stored(x, i, d, masked_store, mask_store, parts, rescale)


def _stored(
    x: MergeInputs, i: int, d: torch.Tensor, masked_store, mask_store, parts: list, rescale: bool
) -> Sparse:
    """A random sparsifier's result: the stored masked delta, rescaled by its kept L1 share when asked
    (``parts``: the kept L1 norms summed chunk by chunk, when the masked delta was not stored whole)."""
    sp = Stored(d, masked_store, mask_store)
    if not rescale:
        return sp
    if masked_store is not None:
        parts = [torch.abs(masked_store, out=x.workspace.buf("whole", d.numel())).sum()]
    return _rescale(x, i, sp, _total(parts))


def della_magprune(x: MergeInputs, i: int, density: float, epsilon: float, rescale: bool = False) -> Sparse:
    """DELLA: keep with probability rising linearly with the magnitude's rank within its row, from
    density - epsilon (smallest) to density + epsilon (largest); 1-D tensors are one row."""
    d = x.delta(i)
    n = d.numel()
    if density >= 1:
        return Dense(d)
    if density <= 0:
        return Zero()
    shape = x.base.shape
    if len(shape) > 2:  # mergekit ranks along dim 1 of the full shape: do exactly that
        return _della_nd(x, i, density, epsilon, rescale)
    cols = shape[-1] if len(shape) == 2 else n
    rows = n // cols if cols else 0
    block = max(1, x.chunk // max(cols, 1))
    masked_store, mask_store = _store(x, i, "sparsify.masked")
    u_buf = x.workspace.buf("sparsify.u", min(n, block * cols))
    parts = []
    starts = range(0, rows, block)
    for r0, ranks in zip(starts, row_ranks(d.view(rows, cols), starts, block), strict=True):
        r1 = min(rows, r0 + block)
        sl = slice(r0 * cols, r1 * cols)
        probs = _della_probs(ranks.add_(1), density, epsilon)
        u = x.stream.uniform_(u_buf[: sl.stop - sl.start], (x.name, i), sl.start).view(r1 - r0, cols)
        mask = torch.lt(u, probs, out=probs)
        out = masked_store[sl] if masked_store is not None else u_buf[: sl.stop - sl.start]
        masked = torch.mul(d[sl], mask.view(-1), out=out)
        if mask_store is not None:
            mask_store[sl].copy_(mask.view(-1))
            if rescale:
                parts.append(masked.abs().sum())
    return _stored(x, i, d, masked_store, mask_store, parts, rescale)


def row_ranks(rows: torch.Tensor, starts: range, block: int) -> Iterator[torch.Tensor]:
    """0-based rank of each |value| within its row, as float32, for row blocks in order: one argsort
    and a scatter (mergekit argsorts twice). torch's argsort, as mergekit's, so tied magnitudes get
    the same ranks (numpy's is ~2.5x faster but orders ties differently)."""
    cols = rows.shape[1]
    arange = torch.arange(cols, dtype=torch.float32, device=rows.device).expand(
        min(block, rows.shape[0]), cols
    )
    for r0 in starts:
        blk = rows[r0 : r0 + block]
        order = torch.argsort(blk.abs(), dim=1)
        ranks = torch.empty(blk.shape, dtype=torch.float32, device=rows.device)
        yield ranks.scatter_(1, order, arange[: blk.shape[0]])


def _della_probs(ranks: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """mergekit's formula, op for op (so the float32 probabilities are bit-identical)."""
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def _della_nd(x: MergeInputs, i: int, density: float, epsilon: float, rescale: bool) -> Sparse:
    d = x.deltas[i]
    order = torch.argsort(d.abs(), dim=1, descending=False)
    probs = _della_probs(order.argsort(dim=1).to(torch.float32) + 1, density, epsilon)
    u = x.stream.uniform_(torch.empty_like(probs), (x.name, i), 0)
    masked = (d * (u < probs)).reshape(-1)
    sp = Stored(x.delta(i), masked.contiguous(), None)
    return _rescale(x, i, sp, l1_float32(masked)) if rescale else sp


def prepare_rescale(x: MergeInputs) -> None:
    """The l1 norms of the task vectors, for rescaling (one pass each)."""
    for i in range(x.n_experts):
        x.abs_sum(i)


def sparsify(
    x: MergeInputs,
    i: int,
    method: str,
    density: float,
    *,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    rescale: bool = False,
) -> Sparse:
    """mergekit's ``sparsify`` dispatch by method name."""
    if method == "magnitude":
        return magnitude(x, i, density, rescale)
    if method == "random":
        return bernoulli(x, i, density, rescale)
    if method == "magnitude_outliers":
        return magnitude_outliers(x, i, density, gamma, rescale)
    if method == "della_magprune":
        return della_magprune(x, i, density, epsilon, rescale)
    raise ValueError(f"unknown sparsification {method!r}")


def prepare_magnitude(x: MergeInputs) -> None:
    """Build every expert's ``OrderSketch`` of |delta| for this tensor (the one-time cost of TIES and
    breadcrumbs: a sort per tensor and expert) and their l1 norms."""
    prepare_rescale(x)
    for i in range(x.n_experts):
        d = x.delta(i)
        x.cached(("order", i), lambda d=d: OrderSketch(d, x.workspace.buf("sort", d.numel())))
