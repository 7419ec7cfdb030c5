"""Random streams for the stochastic methods (dare_*, della*).

mergekit draws its masks with ``torch.bernoulli(p)`` on torch's global generator: per tensor in state
dict order, per expert in input order, one uniform U per element (mt19937, 24 bits), keeping the
element when U < p, and drawing nothing where a method returns early (e.g. density >= 1).

- ``TorchStream`` draws the same uniforms in the same order, so after the same ``torch.manual_seed``
  the masks are bit-identical to mergekit's. One mt19937 stream is serial: ~3 ns per element on one
  core whatever the thread count, the floor of dare's cost.
- ``KeyedStream`` draws uniforms with the same keep rule (keep when U < p) from a counter-based hash
  of (seed, tensor, expert pair, element index): any element's uniform is computed alone, so the
  fused kernels of ``evomerge.merge.fused`` recompute it inside the merge loop on every thread, and a
  tensor's masks do not depend on the rest of the recipe (common random numbers across candidates:
  two recipes that differ in one group draw the same masks everywhere else, and a density change only
  adds or removes elements). Experts 2m and 2m + 1 share one 32-bit hash per element, the high and
  the low 16 bits, so U lies on a 2^-16 grid (torch.rand's is 2^-24): an element is kept with
  probability ceil(p * 2^16) / 2^16, within 1.6e-5 of p, and the fused kernels hash once per element
  for every two experts. The hash is integer arithmetic, exact on any device: a GPU draws the same
  masks as a CPU. The eager path computes it in int64 (every product fits); the fused kernels compute
  the same bits in int32 (``hash32_i32``: wrapping multiplies and masked shifts), which vectorizes on
  every x86 CPU (AVX2 multiplies 8 int32 lanes at once, while a 64-bit multiply needs AVX-512DQ and is
  emulated on AVX2) and on GPUs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable

import torch


class TorchStream:
    """Uniforms on [0, 1) from a torch generator (None: torch's global CPU one), consumed in call order.

    A CPU generator draws on the CPU whatever ``out``'s device (the values are copied there), so a
    merge on a GPU draws the masks a CPU merge (and mergekit on the CPU) draws; a generator on
    ``out``'s device draws there."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator
        self._host: torch.Tensor | None = None  # where draws for another device are made

    def uniform_(self, out: torch.Tensor, key: Hashable = None, start: int = 0) -> torch.Tensor:
        """Fill ``out`` with the stream's next ``out.numel()`` uniforms (``torch.rand``'s values);
        ``key`` and ``start`` are ignored: callers draw in mergekit's order."""
        g = self.generator
        if out.device.type == "cpu" or (g is not None and g.device == out.device):
            return out.uniform_(generator=g)
        n = out.numel()
        if self._host is None or self._host.numel() < n or self._host.dtype != out.dtype:
            self._host = torch.empty(n, dtype=out.dtype, device="cpu")
        host = self._host[:n].uniform_(generator=g)
        return out.copy_(host.view(out.shape))

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
    m1, m2 = MIX_MULTIPLIERS
    x = x ^ (x >> 16)
    x = (x * m1) & MASK32
    x = x ^ (x >> 15)
    x = (x * m2) & MASK32
    return x ^ (x >> 15)


def hash32(index: torch.Tensor, k1: torch.Tensor | int, k2: torch.Tensor | int) -> torch.Tensor:
    """The keyed stream's 32-bit hash of element ``index`` (int64) under keys (k1, k2): ``_mix32`` of
    the offset index ((index + k2) mod 2^32, xor k1, xor the index's high word). Plain torch ops, so
    the compiled kernels in ``evomerge.merge.fused`` compute exactly the same values."""
    return _mix32(((index + k2) & MASK32) ^ k1 ^ (index >> 32))


MIX_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)  # _mix32's; both below 2^31, so int32 constants too
INT32_INDEX_LIMIT = 1 << 31  # hash32_i32 takes element indices below this (index >> 32 is then 0)


def _lsr32(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int32 tensors read as unsigned 32-bit values (torch's ``>>`` on int32 is
    arithmetic: the mask clears the copied sign bits)."""
    return (x >> shift) & ((1 << (32 - shift)) - 1)


def as_int32(key: int) -> int:
    """The int32 with the bits of unsigned 32-bit ``key``."""
    return key - (1 << 32) if key >= 1 << 31 else key


def hash32_i32(index: torch.Tensor, k1: torch.Tensor | int, k2: torch.Tensor | int) -> torch.Tensor:
    """:func:`hash32` in 32-bit arithmetic: the same 32 bits, as int32 (two's complement), for int32
    ``index`` below ``INT32_INDEX_LIMIT`` and keys given as int32 (:func:`as_int32`). Multiplies and
    adds wrap modulo 2^32 as the int64 version's masks do; shifts are logical (:func:`_lsr32`)."""
    m1, m2 = MIX_MULTIPLIERS
    x = (index + k2) ^ k1
    x = x ^ _lsr32(x, 16)
    x = x * m1
    x = x ^ _lsr32(x, 15)
    x = x * m2
    return x ^ _lsr32(x, 15)


def half_bits_i32(h: torch.Tensor, half: int) -> torch.Tensor:
    """The 16 bits of half ``half`` of an int32 hash from :func:`hash32_i32`, as int32 in [0, 2^16):
    the grid point j of the uniform j / 2^16."""
    return _lsr32(h, 16) if half == 0 else h & 0xFFFF


def half_uniform_i32(h: torch.Tensor, half: int) -> torch.Tensor:
    """:func:`half_uniform` of an int32 hash from :func:`hash32_i32` (the same uniforms)."""
    return half_bits_i32(h, half).to(torch.float32) * (2.0**-16)


def half_uniform(h: torch.Tensor, half: int) -> torch.Tensor:
    """The uniform in half ``half`` (0: high 16 bits, 1: low 16 bits) of hash ``h``, as float32 on
    [0, 1) (exact: 16-bit integers are float32 values)."""
    bits = h >> 16 if half == 0 else h & 0xFFFF
    return bits.to(torch.float32) * (2.0**-16)


def hash_uniform(
    index: torch.Tensor, k1: torch.Tensor | int, k2: torch.Tensor | int, half: int = 0
) -> torch.Tensor:
    """The uniforms of elements ``index`` in half ``half`` of the hash keyed (k1, k2)."""
    return half_uniform(hash32(index, k1, k2), half)


KEYED_VERSION = 2  # bump whenever KeyedStream's values change; run folders record the version they drew


class KeyedStream:
    """Uniforms for element ``start + j`` of expert ``i``'s mask on tensor ``name``: half ``i % 2`` of
    a counter-based hash of the element's index under two 32-bit keys derived from (seed, name,
    i // 2), so any range is reproducible alone, in any order, on any number of threads, and cheap
    enough to recompute inside a fused merge kernel."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def keys(self, key: Hashable) -> tuple[int, int]:
        """The two 32-bit keys of hash stream ``key``, e.g. (tensor name, expert pair)."""
        digest = hashlib.blake2b(repr((self.seed, key)).encode(), digest_size=8).digest()
        return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")

    def lane(self, key: tuple[str, int]) -> tuple[int, int, int]:
        """(k1, k2, half) of expert mask ``key`` = (tensor name, expert index): experts 2m and 2m + 1
        read the two halves of pair m's hash."""
        name, i = key
        return (*self.keys((name, i // 2)), i % 2)

    def pair_keys(
        self, name: str, n_experts: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.int64
    ) -> torch.Tensor:
        """(2, ceil(n_experts / 2)) on ``device``: the (k1, k2) of each expert pair's hash on tensor
        ``name``, int64, or with ``dtype=torch.int32`` the same bits as int32 (for :func:`hash32_i32`)."""
        pairs = [self.lane((name, 2 * m))[:2] for m in range((n_experts + 1) // 2)]
        if dtype == torch.int32:
            pairs = [(as_int32(k1), as_int32(k2)) for k1, k2 in pairs]
        return torch.tensor(pairs, dtype=dtype, device=device).T.contiguous()

    def uniform_(self, out: torch.Tensor, key: tuple[str, int], start: int = 0) -> torch.Tensor:
        """Fill ``out`` with the uniforms of elements [start, start + out.numel()) of expert mask
        ``key`` = (tensor name, expert index)."""
        k1, k2, half = self.lane(key)
        index = torch.arange(start, start + out.numel(), dtype=torch.int64, device=out.device)
        return out.copy_(hash_uniform(index, k1, k2, half).view(out.shape))


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
