"""How merges touch memory: reusable scratch buffers, chunked loops and the fused weighted sum.

A merge streams every tensor once. Working chunk by chunk (``CHUNK`` elements) keeps a method's
intermediate results in cache and lets every intermediate live in a buffer that is reused for every
tensor of every merge, so a merge allocates (and page-faults) nothing per tensor.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

CHUNK = 1 << 18  # elements: 1 MiB of float32, several of which fit in L2/L3 cache together
# On accelerators a chunk is one kernel launch per op, not a cache-sized block: larger chunks keep the
# launches (some microseconds each) under the memory time (64 MiB of float32 per op on a GPU).
DEVICE_CHUNK = 1 << 24
# Tensors up to STORE elements may be held whole in scratch (4 MiB of float32): whole-tensor
# reductions then match mergekit's bit for bit. Larger ones (embeddings) are only ever chunked.
STORE = 1 << 20


class Workspace:
    """Named, growable scratch buffers; ``buf(slot, n)`` returns a length-``n`` view of slot's buffer.

    One workspace serves every tensor of every merge of a ``Merger`` (one per worker), so its size is
    that of the largest request, usually a few chunks. Buffers live on the workspace's ``device``;
    ``on(device)`` is a view of the same buffers that allocates on another device (a model spread
    over several devices keeps a set of buffers on each).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device("cpu" if device is None else device)
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def on(self, device: torch.device | str) -> Workspace:
        """This workspace's buffers, allocating on ``device`` (``self`` when it is already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        view = Workspace.__new__(Workspace)
        view.device = device
        view._buffers = self._buffers
        return view

    def buf(self, slot: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (slot, dtype, self.device)
        b = self._buffers.get(key)
        if b is None or b.numel() < n:
            del b
            self._buffers.pop(key, None)  # free the old buffer before allocating the larger one
            b = self._buffers[key] = torch.empty(n, dtype=dtype, device=self.device)
        return b[:n]

    def ones(self, n: int) -> torch.Tensor:
        key = ("ones", torch.float32, self.device)
        b = self._buffers.get(key)
        if b is None or b.numel() < n:
            self._buffers.pop(key, None)
            b = self._buffers[key] = torch.ones(max(n, CHUNK), device=self.device)
        return b[:n]

    def release(self, slot: str) -> None:
        """Free a slot's buffers (all dtypes and devices)."""
        for key in [k for k in self._buffers if k[0] == slot]:
            del self._buffers[key]

    def release_large(self, numel: int) -> None:
        """Free every buffer over ``numel`` elements (those only the largest tensors need)."""
        for key in [k for k, b in self._buffers.items() if b.numel() > numel]:
            del self._buffers[key]

    def nbytes(self, device_type: str | None = None) -> int:
        """Bytes held (on devices of ``device_type`` only, when given)."""
        return sum(
            b.numel() * b.element_size()
            for key, b in self._buffers.items()
            if device_type is None or key[2].type == device_type
        )

    def clear(self) -> None:
        self._buffers.clear()


def release_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold as large blocks are freed, after which chunk-sized temporaries
    fragment the heap: a worker that merges thousands of times would keep hundreds of MiB it does
    not use. Trimming after each merge costs about a millisecond."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def limit_heap_fragmentation(threshold: int = 256 * 1024) -> None:
    """Serve every block over ``threshold`` bytes from mmap, returned to the OS when freed (glibc
    ``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc raising the threshold as large blocks are
    freed; a no-op elsewhere). Chunk-sized temporaries then never fragment the heap: for a worker that
    merges thousands of times it lowers peak RSS by about 0.3 model sizes."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def _malloc_trim() -> Any:
    libc = _libc()
    return libc.malloc_trim if libc is not None else None


def chunk_size(device: torch.device) -> int:
    """Elements per chunk of the loops that run on ``device``: ``CHUNK`` on CPUs, ``DEVICE_CHUNK``
    elsewhere."""
    return CHUNK if device.type == "cpu" else DEVICE_CHUNK


def chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)``, each at most ``size`` long."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def narrow(t: torch.Tensor) -> bool:
    """Whether ``t`` is in a 16-bit float dtype: merges then compute in float32 scratch and round to it
    once per element."""
    return t.dtype in (torch.bfloat16, torch.float16)


def as_float32(src: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``src`` itself when it is float32, else its values converted (exactly) into ``buf``, a float32
    buffer of its size: what the float32 arithmetic of a chunk reads."""
    if src.dtype == torch.float32:
        return src
    return buf.view(src.shape).copy_(src)


def l1_float32(t: torch.Tensor) -> torch.Tensor:
    """sum |t| as a float32 scalar (16-bit tensors are summed in float32, not rounded to 16 bits)."""
    if narrow(t):
        return t.abs().sum(dtype=torch.float32)
    return t.abs().sum()


def weighted_sum(
    out: torch.Tensor,
    base: torch.Tensor | None,
    base_coef: float,
    terms: Sequence[tuple[torch.Tensor, float]],
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """out = base_coef * base + sum_j coef_j * t_j over flat tensors, chunk by chunk, in place.

    The memory-bound kernel behind linear, task arithmetic and every method whose result is an affine
    combination of the base and the task vectors. ``base`` None means a zero base. A 16-bit ``out``
    is summed in a float32 chunk (from ``workspace``) and rounded once.
    """
    n = out.numel()
    terms = [(t, c) for t, c in terms if c != 0]
    chunk = chunk_size(out.device)
    if narrow(out):
        space = workspace.on(out.device) if workspace is not None else Workspace(out.device)
        acc = space.buf("sum.acc", min(n, chunk))
        for sl in chunks(n, chunk):
            o = acc[: sl.stop - sl.start]
            if base is None or base_coef == 0:
                o.zero_()
            else:
                o.copy_(base[sl])
                if base_coef != 1:
                    o.mul_(base_coef)
            for t, c in terms:
                o.add_(t[sl], alpha=c)
            out[sl].copy_(o)
        return out
    for sl in chunks(n, chunk):
        o = out[sl]
        if base is None or base_coef == 0:
            if terms:
                torch.mul(terms[0][0][sl], terms[0][1], out=o)
                rest = terms[1:]
            else:
                o.zero_()
                rest = []
        elif terms and base_coef == 1:
            torch.add(base[sl], terms[0][0][sl], alpha=terms[0][1], out=o)
            rest = terms[1:]
        else:
            torch.mul(base[sl], base_coef, out=o)
            rest = terms
        for t, c in rest:
            o.add_(t[sl], alpha=c)
    return out
