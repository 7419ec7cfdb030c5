"""Random streams for the stochastic methods (dare_*, della*).

mergekit draws its masks with ``torch.bernoulli(p)`` on torch's global generator: per tensor in state
dict order, per expert in input order, one uniform U per element (mt19937, 24 bits), keeping the
element when U < p, and drawing nothing where a method returns early (e.g. density >= 1).

- ``TorchStream`` draws the same uniforms in the same order, so after the same ``torch.manual_seed``
  the masks are bit-identical to mergekit's. One mt19937 stream is serial: ~3 ns per element on one
  core whatever the thread count, the floor of dare's cost.
- ``KeyedStream`` draws the same kind of uniforms with the same keep rule, so the same distribution,
  from generators seeded per (seed, tensor, expert, block of 2^16 elements): blocks are generated in
  parallel on ``torch.get_num_threads()`` threads, and a tensor's masks do not depend on the rest of
  the recipe (common random numbers across candidates: two recipes that differ in one group draw the
  same masks everywhere else).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor

import torch


class TorchStream:
    """Uniforms on [0, 1) from a torch generator (None: torch's global one), consumed in call order."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def uniform_(self, out: torch.Tensor, key: Hashable = None, start: int = 0) -> torch.Tensor:
        """Fill ``out`` with the stream's next ``out.numel()`` uniforms (``torch.rand``'s values);
        ``key`` and ``start`` are ignored: callers draw in mergekit's order."""
        return out.uniform_(generator=self.generator)

    @classmethod
    def seeded(cls, seed: int | torch.Generator | None) -> TorchStream:
        """A fresh generator seeded with ``seed``; a Generator is used as it is; None: the global one."""
        if seed is None or isinstance(seed, torch.Generator):
            return cls(seed)
        return cls(torch.Generator().manual_seed(seed))


class KeyedStream:
    """Uniforms for element ``start + j`` of stream ``key``: block b = (start + j) // BLOCK comes from
    an mt19937 generator seeded with a hash of (seed, key, b), so any range is reproducible alone."""

    BLOCK = 1 << 16
    _pool: ThreadPoolExecutor | None = None
    _pool_size = 0
    _local = threading.local()

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def _generator(self, key: Hashable, block: int) -> torch.Generator:
        digest = hashlib.blake2b(repr((self.seed, key, block)).encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little"))

    def _fill(self, out: torch.Tensor, key: Hashable, start: int, block: int) -> None:
        lo, hi = block * self.BLOCK, (block + 1) * self.BLOCK
        a, b = max(lo, start), min(hi, start + out.numel())
        g = self._generator(key, block)
        if a == lo:
            out[a - start : b - start].uniform_(generator=g)
            return
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = torch.empty(self.BLOCK)
        scratch[: b - lo].uniform_(generator=g)
        out[a - start : b - start].copy_(scratch[a - lo : b - lo])

    def uniform_(self, out: torch.Tensor, key: Hashable = None, start: int = 0) -> torch.Tensor:
        """Fill ``out`` with the uniforms of elements [start, start + out.numel()) of stream ``key``."""
        n = out.numel()
        blocks = range(start // self.BLOCK, (start + n - 1) // self.BLOCK + 1) if n else range(0)
        threads = torch.get_num_threads()
        if threads <= 1 or len(blocks) <= 1:
            for b in blocks:
                self._fill(out, key, start, b)
            return out
        list(self._executor(threads).map(lambda b: self._fill(out, key, start, b), blocks))
        return out

    @classmethod
    def _executor(cls, threads: int) -> ThreadPoolExecutor:
        if cls._pool is None or cls._pool_size != threads:
            if cls._pool is not None:
                cls._pool.shutdown(wait=True)
            cls._pool = ThreadPoolExecutor(threads, thread_name_prefix="evomerge-rng")
            cls._pool_size = threads
        return cls._pool


Stream = TorchStream | KeyedStream


def make_stream(random: str, seed: int | torch.Generator | None) -> Stream:
    """``random="mergekit"``: TorchStream (seeded afresh per merge, or global when seed is None);
    ``random="keyed"``: KeyedStream(seed)."""
    if random == "mergekit":
        return TorchStream.seeded(seed)
    if random == "keyed":
        if not isinstance(seed, int):
            raise ValueError("random='keyed' needs an integer seed")
        return KeyedStream(seed)
    raise ValueError(f"unknown random stream {random!r}; available: mergekit, keyed")
