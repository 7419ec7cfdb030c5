"""Random streams for the stochastic methods (dare_*, della*).

mergekit draws its masks with ``torch.bernoulli(p)`` on torch's global generator: per tensor in state
dict order, per expert in input order, one uniform U per element (mt19937, 24 bits), keeping the
element when U < p, and drawing nothing where a method returns early (e.g. density >= 1).

- ``TorchStream`` draws the same uniforms in the same order, so after the same ``torch.manual_seed``
  the masks are bit-identical to mergekit's. One mt19937 stream is serial: ~3 ns per element on one
  core whatever the thread count, the floor of dare's cost.
- ``KeyedStream`` draws uniforms on the same 24-bit grid with the same keep rule, so the same
  distribution, from a counter-based hash of (seed, tensor, expert, element index): any element's
  uniform is computed alone, so the fused kernels of ``evomerge.merge.fused`` recompute it inside
  the merge loop on every thread, and a tensor's masks do not depend on the rest of the recipe
  (common random numbers across candidates: two recipes that differ in one group draw the same masks
  everywhere else, and a density change only adds or removes elements).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable

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


MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with low bias (shifts 16/15/15, two odd multipliers below 2^31, so every
    product fits in int64): a bijection on [0, 2^32), on int64 tensors holding such values."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def hash_uniform(index: torch.Tensor, k1: torch.Tensor | int, k2: torch.Tensor | int) -> torch.Tensor:
    """The keyed stream's uniform for element ``index`` (int64) under keys (k1, k2): ``_mix32`` of the
    offset index ((index + k2) mod 2^32, xor k1, xor the index's high word), its top 24 bits scaled to
    [0, 1) as float32 (the grid of torch.rand). Plain torch ops, so the compiled kernels in
    ``evomerge.merge.fused`` compute exactly the same values."""
    h = _mix32(((index + k2) & MASK32) ^ k1 ^ (index >> 32))
    return (h >> 8).to(torch.float32) * (2.0**-24)


class KeyedStream:
    """Uniforms for element ``start + j`` of stream ``key``: a counter-based hash of the element's
    index under two 32-bit keys derived from (seed, key), so any range is reproducible alone, in any
    order, on any number of threads, and cheap enough to recompute inside a fused merge kernel."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def keys(self, key: Hashable) -> tuple[int, int]:
        """The two 32-bit keys of stream ``key``."""
        digest = hashlib.blake2b(repr((self.seed, key)).encode(), digest_size=8).digest()
        return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")

    def uniform_(self, out: torch.Tensor, key: Hashable = None, start: int = 0) -> torch.Tensor:
        """Fill ``out`` with the uniforms of elements [start, start + out.numel()) of stream ``key``."""
        k1, k2 = self.keys(key)
        index = torch.arange(start, start + out.numel(), dtype=torch.int64)
        return out.copy_(hash_uniform(index, k1, k2).view(out.shape))


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
