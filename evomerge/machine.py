"""The machine a memory plan is made for (:class:`Machine`: device kind, each GPU's memory, host memory,
CPU cores), and the byte sizes the plan reads and writes (``80GiB``, ``1.5 GiB``)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class Machine:
    """What a plan is made for: the device kind, each GPU's memory, host memory and CPU cores."""

    device: Literal["cpu", "cuda"]
    gpus: tuple[int, ...] = ()
    host: int = 0
    cpus: int = 1
    described: str = "this machine"

    @classmethod
    def here(
        cls,
        device: str,
        gpus: int | None = None,
        gpu_memory: int | None = None,
        host_memory: int | None = None,
        cpus: int | None = None,
    ) -> Machine:
        """This machine, or one described by the overrides (``evomerge plan --gpus 4 --gpu-memory ...``)."""
        kind: Literal["cpu", "cuda"] = "cuda" if device.startswith("cuda") else "cpu"
        overridden = any(v is not None for v in (gpus, gpu_memory, host_memory, cpus))
        memories: tuple[int, ...] = ()
        if kind == "cuda":
            seen = _cuda_memories()
            if device.startswith("cuda:") and seen:
                index = int(device.split(":")[1])
                seen = seen[index : index + 1]
            n = gpus if gpus is not None else len(seen)
            per = gpu_memory if gpu_memory is not None else (min(seen) if seen else 0)
            memories = (per,) * n
        return cls(
            kind,
            memories,
            host_memory if host_memory is not None else host_available(),
            cpus if cpus is not None else (os.cpu_count() or 1),
            "the machine described" if overridden else "this machine",
        )


def _cuda_memories() -> tuple[int, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    return tuple(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def host_available() -> int:
    """Host memory available to new processes (MemAvailable), else the total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20}
_UNITS |= {"g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str, what: str) -> int:
    """``80GiB``, ``80GB``, ``512MiB``, ``1.5TiB`` or a number of bytes."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = found[2].lower() if found else None
    value = float(found[1]) * _UNITS[unit] if found and unit in _UNITS else 0.0
    if not 0 < value < math.inf:
        raise EvomergeError(f"{what} {text!r} is not a size; write e.g. 80GiB, 80GB or 512MiB")
    return int(value)


def size(n: float) -> str:
    """Bytes in GiB, MiB or KiB, whichever reads best (a count past any float, from an absurd setting
    such as batch_size 10^400, as its power of ten)."""
    if isinstance(n, int) and n >= 2**1000:
        return f"about 10^{len(str(n)) - 1} bytes"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"


def params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def cpu_description() -> str:
    """The CPU model, its widest x86 vector instruction set (AVX-512, AVX2, or neither) and the core count,
    for the header of a benchmark table: ``Intel(R) Xeon(R) ... (AVX-512), 2 cores``."""
    import platform

    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model or platform.processor() or 'unknown CPU'} ({isa}), {os.cpu_count()} cores"
