"""The streamed placement: task vectors kept in host memory, copied to the device tensor by tensor.

A ``HostStore`` is one flat host allocation carved into each tensor's (K, *shape) task-vector stack,
page-locked (``cudaHostRegister``) when it feeds a GPU, so copies from it are DMA transfers that run
beside the merge. One registration of the exact size rather than ``pin_memory()``: torch's pinned
allocator rounds every allocation up to a power of two (up to twice the host memory).

``Staging`` copies each tensor's stack into a reusable device buffer just before its method runs. On
a CUDA device the next tensor's stack is copied on a side stream into a second buffer while this one
merges (double buffering: the copy waits for the merge that last read its buffer, the merge waits for
its copy); elsewhere (a CPU "device") it is a plain copy into one buffer. Both need 2 (CUDA) or 1
buffers of K x the largest tensor per device.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterable, Iterator, Mapping

import torch

log = logging.getLogger(__name__)


def _unregister(ptr: int) -> None:
    # at interpreter shutdown CUDA may be torn down already: nothing left to release then
    with contextlib.suppress(Exception):
        torch.cuda.cudart().cudaHostUnregister(ptr)


class HostStore:
    """Each tensor's (K, *shape) stack as a view of one flat host tensor; ``pinned`` when it was
    page-locked for the GPUs (``pin=True`` and CUDA available; registration failing is logged once and
    leaves ordinary pageable memory, which is correct but copies synchronously)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, pin: bool) -> None:
        total = sum(_numel(s) for s in shapes.values())
        self.flat = torch.empty(total, dtype=dtype, device="cpu")
        self.views: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in shapes.items():
            n = _numel(shape)
            self.views[name] = self.flat[offset : offset + n].view(shape)
            offset += n
        self.pinned = False
        if pin and total and torch.cuda.is_available():
            ptr, size = self.flat.data_ptr(), total * self.flat.element_size()
            try:
                err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 1))  # cudaHostRegisterPortable
            except Exception as e:  # noqa: BLE001 - no cudart binding: stay pageable
                err = -1
                log.warning("could not page-lock the streamed task vectors (%s); copies will block", e)
            if err == 0:
                self.pinned = True
                weakref.finalize(self, _unregister, ptr)
            elif err != -1:
                log.warning("cudaHostRegister failed (error %d); streamed copies will block", err)

    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class Staging:
    """Reusable device buffers for the task vectors of ``host`` (name -> (K, *shape) host tensor), each
    tensor's on ``devices[name]``."""

    def __init__(self, host: Mapping[str, torch.Tensor], devices: Mapping[str, torch.device]) -> None:
        self.host = host
        self.devices = devices
        self.size: dict[torch.device, int] = {}  # elements per buffer: K x the device's largest tensor
        for name, t in host.items():
            dev = devices[name]
            self.size[dev] = max(self.size.get(dev, 0), t.numel())
        self.buffers: dict[tuple[torch.device, int], torch.Tensor] = {}
        self.side: dict[torch.device, torch.cuda.Stream] = {}
        self.free: dict[tuple[torch.device, int], torch.cuda.Event] = {}  # the last merge reading a buffer

    def nbytes(self, device_type: str | None = None) -> int:
        return sum(
            b.numel() * b.element_size()
            for (dev, _), b in self.buffers.items()
            if device_type is None or dev.type == device_type
        )

    def _buffer(self, name: str, slot: int) -> torch.Tensor:
        dev = self.devices[name]
        src = self.host[name]
        key = (dev, slot)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty(self.size[dev], dtype=src.dtype, device=dev)
            if dev.type == "cuda":
                side = self._side(dev)
                buf.record_stream(side)  # freed only once the side stream's copies into it are done
                side.wait_stream(torch.cuda.current_stream(dev))  # memory the merge stream may still use
        return buf[: src.numel()].view(src.shape)

    def _side(self, dev: torch.device) -> torch.cuda.Stream:
        if dev not in self.side:
            self.side[dev] = torch.cuda.Stream(dev)
        return self.side[dev]

    def fetch(self, name: str) -> torch.Tensor:
        """A fresh device copy of one tensor's task vectors (outside a merge's stream of copies)."""
        return self.host[name].to(self.devices[name])

    def stream(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, task vectors on its device) in order, each ready for the current stream; on
        CUDA the next tensor's copy runs on a side stream while the caller merges this one. A buffer
        yielded is overwritten once the caller asks for the next but one."""
        names = list(names)
        pending: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}

        def issue(j: int) -> None:
            if j >= len(names) or j in pending or self.devices[names[j]].type != "cuda":
                return
            name = names[j]
            dev = self.devices[name]
            buf = self._buffer(name, j % 2)
            side = self._side(dev)
            with torch.cuda.stream(side):
                free = self.free.pop((dev, j % 2), None)
                if free is not None:
                    side.wait_event(free)
                buf.copy_(self.host[name], non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(side)
            pending[j] = (buf, ready)

        for dev in {self.devices[n] for n in names if self.devices[n].type == "cuda"}:
            self._side(dev).wait_stream(torch.cuda.current_stream(dev))  # after the last merge's writes
        try:
            for i, name in enumerate(names):
                dev = self.devices[name]
                if dev.type == "cuda":
                    issue(i)
                    buf, ready = pending.pop(i)
                    torch.cuda.current_stream(dev).wait_event(ready)
                else:
                    buf = self._buffer(name, 0)
                    buf.copy_(self.host[name])
                issue(i + 1)
                yield name, buf
                if dev.type == "cuda":
                    done = torch.cuda.Event()
                    done.record(torch.cuda.current_stream(dev))
                    self.free[(dev, i % 2)] = done
        finally:
            for dev, side in self.side.items():
                torch.cuda.current_stream(dev).wait_stream(side)  # no copy outlives the merge
