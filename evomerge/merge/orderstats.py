"""Exact order statistics of a fixed tensor, for any rank, without sorting per query.

Magnitude sparsification needs the k-th largest |delta| for whatever density a candidate asks for.
Sorting per merge costs ~40-100 ns per element; a full sorted copy per expert costs as much memory as
the expert itself. An ``OrderSketch`` keeps every ``STEP``-th sorted value and how many values lie
below each (12 bytes per 256 elements: 1/85 of the float32 tensor): a rank's value is bracketed by two
neighbouring sketch values; when it is not one of them, one streaming pass collects the few values
inside the bracket (``hardshrink`` twice and a sparse ``nonzero``: ~0.5 ns per element) and the answer
is read from their sorted order. The result is exact, the value ``torch.kthvalue`` returns, and comes
with the positions of the values tied with it, so callers can keep exactly k elements.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from evomerge.merge.kernels import Workspace, as_float32, chunk_size, chunks

STEP = 256

# source(sl, buf) -> the values for elements sl (any sign; their magnitudes are ranked), may use buf
Source = Callable[[slice, torch.Tensor], torch.Tensor]


def below(value: float) -> float:
    """The largest float32 strictly below ``value``: ``|x| > below(t)`` is ``|x| >= t`` for float32 x."""
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def _indices(n: int) -> np.ndarray:
    """The sorted positions a sketch keeps: every STEP-th and the last."""
    idx = np.arange(0, n, STEP)
    if n and idx[-1] != n - 1:
        idx = np.append(idx, n - 1)
    return idx


def _numpy_sketch(buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(values, counts below them, zero count) of the magnitudes ``buf`` (CPU), sorted in place."""
    a = buf.numpy()
    a.sort()
    vals = a[_indices(a.size)]
    below = np.searchsorted(a, vals, side="left").astype(np.int64)
    return torch.from_numpy(vals.copy()), torch.from_numpy(below), int(np.searchsorted(a, 0.0, side="right"))


def _torch_sketch(buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``_numpy_sketch`` with ``torch.sort`` on ``buf``'s device (a GPU), returned on the CPU: the
    same sorted values (task vectors hold no NaNs), so the same sketch."""
    a = torch.sort(buf).values
    idx = torch.from_numpy(_indices(a.numel())).to(a.device)
    vals = a[idx]
    below = torch.searchsorted(a, vals, side="left")
    zeros = torch.searchsorted(a, torch.zeros(1, dtype=a.dtype, device=a.device), side="right")
    return (
        vals.to(device="cpu", dtype=torch.float32),
        below.to(device="cpu", dtype=torch.int64),
        int(zeros.item()),
    )


class OrderSketch:
    """Every STEP-th order statistic of |x| (and the last), with exact counts below each."""

    __slots__ = ("below", "n", "values", "zeros")

    def __init__(self, x: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
        """Sort |x| once; ``scratch`` (float32, at least x's size, on x's device) holds |x|, sorted in
        place on the CPU, then discarded (x itself may be passed to sort in place). On another device
        (a GPU) ``torch.sort`` sorts there. Either way the sketch is the same and is kept on the CPU:
        it is small, and lookups read it as Python numbers."""
        flat = x.detach().reshape(-1)
        n = flat.numel()
        buf = torch.empty(n, device=flat.device) if scratch is None else scratch.reshape(-1)[:n]
        torch.abs(as_float32(flat, buf), out=buf)
        self.n = n
        sketch = _numpy_sketch if flat.device.type == "cpu" else _torch_sketch
        self.values, self.below, self.zeros = sketch(buf)

    def nbytes(self) -> int:
        return self.values.numel() * 4 + self.below.numel() * 8

    def value(self, rank: int, source: Source, workspace: Workspace) -> float:
        """The ``rank``-th smallest |x| (0-based): one lookup, or a lookup and one pass over ``source``."""
        return self.select(rank, source, workspace, ties=False).value

    def select(self, rank: int, source: Source, workspace: Workspace, ties: bool = True) -> Selection:
        """The ``rank``-th smallest |x| (0-based) with how many values lie below it and, when ``ties``,
        the flat indices of the values equal to it (ascending); finding them may take one pass."""
        if not 0 <= rank < self.n:
            raise IndexError(f"rank {rank} outside [0, {self.n})")
        j, off = divmod(rank, STEP)
        lo = float(self.values[j])
        if off and rank != self.n - 1 and lo != float(self.values[j + 1]):
            hi = float(self.values[j + 1])
            vals, idx = self._window(lo, hi, source, workspace)
            zeros = self.zeros if lo == 0 else 0  # in the window but not collected
            pos = rank - int(self.below[j]) - zeros
            v = float(torch.kthvalue(vals, pos + 1).values) if pos >= 0 else 0.0
            less = int(self.below[j]) + (zeros if v > 0 else 0) + int((vals < v).sum())
            if not ties or v == 0:
                return Selection(v, less, None)
            return Selection(v, less, idx[vals == v])
        if off == 0:
            v, less = lo, int(self.below[j])
        else:  # lo == hi (a run of equal values) or the maximum
            k = j + 1 if rank == self.n - 1 else j
            v, less = float(self.values[k]), int(self.below[k])
        if not ties or v == 0:
            return Selection(v, less, None)
        _, idx = self._window(v, v, source, workspace)
        return Selection(v, less, idx)

    def _window(
        self, lo: float, hi: float, source: Source, workspace: Workspace
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Magnitudes in [lo, hi] and their flat indices, in index order, on the workspace's device (the
        source's). Zeros are not collected (when lo == 0 they are counted by ``self.zeros``)."""
        lo_m = below(lo)
        chunk = chunk_size(workspace.device)
        size = min(chunk, self.n)
        a_buf, b_buf, s_buf = (workspace.buf(f"order.{k}", size) for k in ("a", "b", "src"))
        values, indices = [], []
        for sl in chunks(self.n, chunk):
            m = sl.stop - sl.start
            v = source(sl, s_buf[:m])
            a = torch.hardshrink(v, lo_m, out=a_buf[:m])  # |v| >= lo
            torch.hardshrink(a, hi, out=b_buf[:m])  # |v| > hi
            a.sub_(b_buf[:m])  # lo <= |v| <= hi, others 0
            nz = a.nonzero().squeeze(1)
            values.append(a[nz].abs())
            indices.append(nz + sl.start)
        return torch.cat(values), torch.cat(indices)


class Selection:
    """An order statistic: its ``value``, the count of magnitudes ``less`` than it, and the flat
    indices of those ``equal`` to it (None when not asked for, or for 0, where ties never matter)."""

    __slots__ = ("equal", "less", "value")

    def __init__(self, value: float, less: int, equal: torch.Tensor | None) -> None:
        self.value = value
        self.less = less
        self.equal = equal


def select_direct(source: torch.Tensor, rank: int, ties: bool = True) -> Selection:
    """Without a sketch: ``OrderSketch.select`` by ``kthvalue`` and comparisons over the whole tensor."""
    flat = source.reshape(-1).abs()
    v = float(torch.kthvalue(flat, rank + 1).values)
    less = int((flat < v).sum())
    if not ties or v == 0:
        return Selection(v, less, None)
    return Selection(v, less, (flat == v).nonzero().squeeze(1))
