"""The memory plan: what each worker holds on its device and in host memory under each placement,
which placement a run uses and how many workers fit, known before any weight is read.

A model's size comes from its safetensors headers (local folders) or, where there are none, from its
config.json (the model is built on torch's ``meta`` device, which allocates nothing): :mod:`evomerge.shapes`;
the machine it is made for: :mod:`evomerge.machine`. Placements:

- ``device``: the base, the K task vectors and the one output model on the worker's device:
  (K + 2) model sizes there;
- ``streamed``: the task vectors in pinned host memory, copied to the device tensor by tensor during a
  merge: base and output (2 model sizes) plus two K-stacks of the largest tensor on the device, K model
  sizes of host memory;
- ``host``: everything in host memory, for ``device: cpu``.

Besides the weights a worker holds the order-statistics sketches of the TIES family in host memory
(1/85 of a float32 model per expert), keyed dare's kept-l1 tables there too (``KEPT_TABLE_BYTES`` per
expert and tensor of ``KEPT_TABLE_MIN`` elements or more, ``ModelShape.tabled``), the subspace methods' SVD factors where it merges (up to a + b K
float32 model sizes per method, ``MergeMethod.cache_models``), and on its merging device the larger of two peaks: building
those sketches once (sorting the largest tensor), or a merge's scratch (chunks of float32) plus the
fitness's memory: lm-eval's activations, estimated for ``fitness.batch_size`` sequences of
``fitness.max_length`` tokens (default: the model's context, at most 2048), or what a Python fitness
declares in ``fitness.memory`` (default FITNESS_MEMORY).

The plan chooses what the config leaves unset: on a GPU the largest lm-eval batch (up to DEFAULT_BATCH)
whose activations fit beside the merge state, the fewest whole GPUs per worker that hold one, and as
many workers as fit. When nothing fits, its one-line refusal names the smallest change that would.

This module needs torch alone (transformers only to size a model from its config), so the GPU
benchmark can compare a measured peak with the plan's prediction where pydantic is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from evomerge.errors import EvomergeError

# The machine and the sizes of models, in their own modules; importable from here as before.
from evomerge.machine import Machine, host_available, params, parse_bytes, size  # noqa: F401
from evomerge.shapes import (  # noqa: F401
    DEFAULT_CONTEXT,
    DTYPE_BYTES,
    FLOAT_STORED,
    KEPT_TABLE_BYTES,
    QUANTIZED_STORED,
    ModelShape,
    check_loadable,
    local_config,
    model_shape,
    shape_from_config,
    shape_from_headers,
)

Placement = Literal["device", "streamed", "host"]
PLACEMENTS: tuple[Placement, ...] = ("device", "streamed", "host")

SKETCH_FRACTION = 1 / 85  # the magnitude sketches per expert, of a float32 model
# A merge works through a tensor in chunks of this many elements (evomerge.merge's GPU and CPU loops).
GPU_CHUNK = 1 << 24
CPU_CHUNK = 1 << 18
# Planning margins, not measurements: a CUDA context and the allocator's slack per worker on its GPU,
# and a worker process's libraries (torch, transformers, lm-eval) in host memory.
DEVICE_MARGIN = 1 << 30
HOST_PROCESS = 1 << 30
# fitness.batch_size unset: lm-eval's default batch, and the most the plan chooses on a GPU.
DEFAULT_BATCH = 64
# fitness.memory unset: what the plan reserves on a worker's device for a Python fitness it cannot see.
FITNESS_MEMORY = 2 << 30


@dataclass(frozen=True)
class Memory:
    """Bytes one worker holds on its device and in host memory."""

    device: int
    host: int


def worker_memory(
    placement: str,
    *,
    model_bytes: int,
    largest_bytes: int,
    experts: int,
    sketch_bytes: int = 0,
    activation_bytes: int = 0,
    scratch_bytes: int = 0,
    transient_bytes: int = 0,
    cache_bytes: int = 0,
) -> Memory:
    """One worker's memory under ``placement`` for a model of ``model_bytes`` (compute dtype) whose
    largest tensor has ``largest_bytes`` and ``experts`` task vectors: the weights where the placement
    puts them, the sketches in host memory, and on the merging device the larger of the one-time
    ``transient_bytes`` (building the sketches) and a merge's ``scratch_bytes`` plus the fitness's
    ``activation_bytes``, plus the subspace methods' ``cache_bytes`` where the merges run. Margins
    (CUDA context, libraries) are not included: this is the arithmetic of what evomerge allocates."""
    k = experts
    work = max(transient_bytes, scratch_bytes + activation_bytes) + cache_bytes
    if placement == "device":
        return Memory((k + 2) * model_bytes + work, sketch_bytes)
    if placement == "streamed":
        return Memory(2 * model_bytes + 2 * k * largest_bytes + work, k * model_bytes + sketch_bytes)
    if placement == "host":
        return Memory(0, (k + 2) * model_bytes + sketch_bytes + work)
    raise EvomergeError(f"unknown placement {placement!r}; allowed: {', '.join(PLACEMENTS)}")


def merge_work(largest: int, experts: int, cuda: bool, sketches: bool) -> tuple[int, int]:
    """(scratch, transient) bytes of merges whose largest tensor has ``largest`` elements: about K + 10
    float32 chunks of it while a tensor merges (GPU_CHUNK elements on a GPU, CPU_CHUNK on a CPU), and,
    for the TIES family's sketches, sorting the largest tensor once (torch.sort on a GPU needs about
    28 bytes per element; numpy on a CPU 4)."""
    chunk = GPU_CHUNK if cuda else CPU_CHUNK
    scratch = (experts + 10) * min(largest, chunk) * 4
    transient = (28 if cuda else 4) * largest if sketches else 0
    return scratch, transient


# --- the plan -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One placement on the machine: each worker's memory and how many workers fit."""

    placement: Placement
    memory: Memory
    fit: int  # workers that fit (0: none)
    limit: str  # what limits the count
    batch: int | None = None  # lm-eval's batch under this placement (None: a Python fitness)


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    dtype: str
    experts: int
    machine: Machine
    gpus_per_worker: float
    options: tuple[Option, ...]
    chosen: Option
    workers: int
    activations: int  # the fitness's memory per worker: lm-eval's activations, or a Python fitness's
    tokens: int = 0  # tokens per sequence that lm-eval's activations are planned for
    unset: frozenset[str] = frozenset()  # settings the config left to the plan

    @property
    def model_bytes(self) -> int:
        return self.shape.bytes(self.dtype)

    @property
    def batch(self) -> int | None:
        """The batch the workers pass to lm-eval (None: a Python fitness)."""
        return self.chosen.batch

    def lines(self) -> list[str]:
        """The plan as a small table (what ``evomerge plan`` and the start of a run print)."""
        s, m = self.shape, self.machine
        if m.device == "cpu":
            where = "cpu"
        elif m.gpus:
            where = f"{len(m.gpus)} GPU(s) of {size(m.gpus[0])}"
        else:
            where = "no GPU"
        experts = f"{self.experts} expert" + ("s" if self.experts != 1 else "")
        out = [
            f"model     {params(s.elements)} parameters ({s.source}), {size(self.model_bytes)} in {self.dtype}; "
            f"{experts}",
            f"fitness   {self._fitness()}",
            f"machine   {where}, {size(m.host)} host memory available, {m.cpus} CPU cores ({m.described})",
            f"{'placement':9s} {'device':>10s} {'host':>10s}   workers (per worker, margins included)",
        ]
        chosen_batch = "batch_size" in self.unset and m.device == "cuda" and self.batch is not None
        for o in self.options:
            device = "-" if o.placement == "host" else size(o.memory.device + DEVICE_MARGIN)
            fits = f"{o.fit} fit ({o.limit})" if o.fit else f"none fit ({o.limit})"
            fits += f", batch {o.batch}" if chosen_batch else ""
            out.append(f"{o.placement:9s} {device:>10s} {size(o.memory.host + HOST_PROCESS):>10s}   {fits}")
        gpus = (
            f", {self.gpus_per_worker:g} GPU(s) each" if m.device == "cuda" and self.gpus_per_worker else ""
        )
        if "gpus_per_worker" in self.unset and self.gpus_per_worker > 1:
            gpus += " (gpus_per_worker unset: one GPU holds no worker)"
        out.append(f"chosen    {self.chosen.placement}, {self.workers} worker(s){gpus}")
        return out

    def _fitness(self) -> str:
        if self.batch is None:
            why = "fitness.memory unset: the default" if "fitness.memory" in self.unset else "fitness.memory"
            return f"a Python function, {size(self.activations)} reserved per worker ({why})"
        why = ""
        if "batch_size" in self.unset:
            why = " (batch_size unset" + (
                f": the largest up to {DEFAULT_BATCH} that fits)" if self.machine.device == "cuda" else ")"
            )
        return (
            f"lm-eval, batch {self.batch} x {self.tokens} tokens{why}, "
            f"{size(self.activations)} of activations per worker"
        )


@dataclass(frozen=True)
class _Sizes:
    """What a worker holds besides its fitness, in bytes, and what its fitness needs."""

    model: int
    largest: int
    experts: int
    sketch: int
    scratch: int
    transient: int
    cache: int
    sequence: int  # lm-eval's activations per sequence
    fitness: int | None  # a Python fitness's memory (None: lm-eval's activations)

    def memory(self, placement: str, activations: int) -> Memory:
        return worker_memory(
            placement,
            model_bytes=self.model,
            largest_bytes=self.largest,
            experts=self.experts,
            sketch_bytes=self.sketch,
            activation_bytes=activations,
            scratch_bytes=self.scratch,
            transient_bytes=self.transient,
            cache_bytes=self.cache,
        )

    def largest_batch(self, placement: str, room: int, cap: int) -> int:
        """The most sequences, at most ``cap``, whose activations fit in ``room`` bytes of device beside
        the merge state (0: not one). The device holds max(transient, scratch + activations) on top of
        the weights and caches, so activations may also use what the one-time transient leaves."""
        held = worker_memory(
            placement,
            model_bytes=self.model,
            largest_bytes=self.largest,
            experts=self.experts,
            cache_bytes=self.cache,
        ).device
        left = room - held
        if left < max(self.transient, self.scratch + self.sequence):
            return 0
        return min(cap, (left - self.scratch) // self.sequence)


@dataclass(frozen=True)
class _Ask:
    """What a plan is asked for; what the config leaves unset, the plan chooses."""

    workers: int | None  # None: as many as fit
    placements: tuple[Placement, ...]  # the fastest that fits is chosen
    gpus: tuple[float, ...]  # GPUs per worker to try, fewest first
    batch: int | None  # None: the largest up to cap that fits a GPU (elsewhere cap)
    cap: int = DEFAULT_BATCH


def plan(
    shape: ModelShape,
    dtype: str,
    experts: int,
    machine: Machine,
    *,
    gpus_per_worker: float | None = 1.0,
    threads: int = 1,
    workers: int | None = None,
    placement: str = "auto",
    batch_size: int | None = 8,
    max_length: int | None = None,
    fitness_memory: int | None = None,
    python: bool = False,  # a Python fitness: it gets fitness_memory (default FITNESS_MEMORY), no batch
    sketches: bool = True,  # the search uses a method with magnitude sketches (the TIES family)
    cache_models: float = 0.0,  # float32 model sizes of the subspace methods' SVD factors
    kept_tables: bool = False,  # the search uses keyed dare (a kept-l1 table per large tensor and expert)
) -> Plan:
    """Each placement's memory per worker on ``machine``, and the one the run uses: the fastest that
    fits ``workers`` (None: the most workers that fit, at least one). ``gpus_per_worker`` None: the
    fewest whole GPUs per worker that fit; ``batch_size`` None: on a GPU the largest lm-eval batch up to
    DEFAULT_BATCH whose activations fit beside the merge state, elsewhere DEFAULT_BATCH. Raises one line
    with the numbers when nothing fits, naming the smallest change that would fit."""
    tokens = min(max_length or DEFAULT_CONTEXT, shape.context or DEFAULT_CONTEXT)
    scratch, transient = merge_work(shape.largest, experts, machine.device == "cuda", sketches)
    sizes = _Sizes(
        model=shape.bytes(dtype),
        largest=shape.largest * DTYPE_BYTES[dtype],
        experts=experts,
        sketch=(int(experts * shape.elements * 4 * SKETCH_FRACTION) if sketches else 0)
        + (experts * shape.tabled * KEPT_TABLE_BYTES if kept_tables else 0),
        scratch=scratch,
        transient=transient,
        cache=int(cache_models * shape.elements * 4),
        sequence=max(1, shape.activations(1, tokens, dtype)),
        fitness=(fitness_memory or FITNESS_MEMORY) if python else None,
    )
    candidates: tuple[Placement, ...] = ("device", "streamed") if machine.device == "cuda" else ("host",)
    if placement != "auto":
        if placement not in PLACEMENTS:
            raise EvomergeError(f"unknown placement {placement!r}; allowed: auto, {', '.join(PLACEMENTS)}")
        if placement not in candidates:
            allowed = ", ".join(candidates)
            raise EvomergeError(
                f"placement {placement!r} needs another device; on {machine.device}: {allowed}"
            )
        candidates = (placement,)
    wholes = tuple(float(n) for n in range(1, max(1, len(machine.gpus)) + 1))
    gpus = wholes if gpus_per_worker is None else (gpus_per_worker,)
    ask = _Ask(workers, candidates, gpus, None if python else batch_size)
    options, chosen, g = _attempt(sizes, machine, threads, ask)
    if chosen is None:
        tried = f" (nor with up to {len(gpus):g} GPUs per worker)" if len(gpus) > 1 else ""
        raise EvomergeError(
            _refusal(options, machine, workers, sizes.model, dtype)
            + tried
            + _fix(sizes, machine, threads, ask)
        )
    unset = {"gpus_per_worker"} if gpus_per_worker is None else set()
    unset |= {"fitness.memory"} if python and fitness_memory is None else set()
    unset |= {"batch_size"} if not python and batch_size is None else set()
    return Plan(
        shape,
        dtype,
        experts,
        machine,
        g,
        options,
        chosen,
        workers or chosen.fit,
        sizes.fitness if chosen.batch is None else chosen.batch * sizes.sequence,
        tokens,
        frozenset(unset),
    )


def _attempt(
    sizes: _Sizes, machine: Machine, threads: int, ask: _Ask
) -> tuple[tuple[Option, ...], Option | None, float]:
    """(each placement's option, the one chosen or None, the GPUs per worker): the fewest GPUs per worker
    under which a placement fits, and there the fastest placement that does. The options shown on a
    refusal are those of the fewest GPUs."""
    first: tuple[Option, ...] = ()
    for g in ask.gpus:
        room = _room(machine, g, ask.workers) if machine.device == "cuda" else None
        options = tuple(_option(sizes, p, machine, g, threads, room, ask) for p in ask.placements)
        first = first or options
        chosen = next((o for o in options if o.fit >= (ask.workers or 1)), None)
        if chosen is not None:
            return options, chosen, g
    return first, None, ask.gpus[0]


def _option(
    sizes: _Sizes, placement: Placement, machine: Machine, g: float, threads: int, room: int | None, ask: _Ask
) -> Option:
    batch = None
    if sizes.fitness is None:
        batch = ask.batch
        if batch is None:  # the plan's: the largest that fits beside the merge state (at least 1)
            batch = ask.cap if room is None else max(1, sizes.largest_batch(placement, room, ask.cap))
    memory = sizes.memory(placement, sizes.fitness if batch is None else batch * sizes.sequence)
    return Option(placement, memory, *_fit(memory, machine, g, threads), batch)


def _room(machine: Machine, g: float, workers: int | None) -> int:
    """Bytes of GPU memory a worker of ``g`` GPUs may use, margin left out (``g`` 0: a fixed cuda:N,
    which every worker shares)."""
    per = min(machine.gpus) if machine.gpus else 0
    if g == 0:
        share = per // (workers or 1)
    elif g <= 1:
        share = per // int(1 / g + 1e-9)
    else:
        share = int(g) * per
    return share - DEVICE_MARGIN


def _fit(memory: Memory, machine: Machine, gpus_per_worker: float, threads: int) -> tuple[int, str]:
    """How many workers of ``memory`` fit on the machine, and what limits them."""
    host_need = memory.host + HOST_PROCESS
    by_host = machine.host // host_need
    counts = {"host memory": by_host}
    if machine.device == "cuda":
        need = memory.device + DEVICE_MARGIN
        g = gpus_per_worker
        if g == 0:  # a fixed cuda:N: every worker on that GPU
            counts["GPU memory"] = sum(m // need for m in machine.gpus)
        elif g <= 1:
            slots = int(1 / g + 1e-9)
            counts["GPU memory"] = sum(slots for m in machine.gpus if slots * need <= m)
            counts["GPUs"] = len(machine.gpus) * slots
        else:
            per_worker = int(g)
            groups = len(machine.gpus) // per_worker
            ok = machine.gpus and need <= per_worker * min(machine.gpus)
            counts["GPU memory"] = groups if ok else 0
            counts["GPUs"] = groups
    else:
        counts["CPU cores"] = max(1, machine.cpus // threads)
    limit = min(counts, key=lambda k: counts[k])
    return int(counts[limit]), limit


def _fix(sizes: _Sizes, machine: Machine, threads: int, ask: _Ask) -> str:
    """The refusal's end, "; it fits with ...": the first single change that fits, tried in the order a
    smaller batch_size, fewer workers, placement streamed, more GPUs per worker, else those changes
    together; "" when nothing fits."""
    cuda = machine.device == "cuda"
    changes: dict[str, _Ask] = {}
    if cuda and sizes.fitness is None and ask.batch is not None and ask.batch > 1:
        changes["batch_size"] = replace(ask, batch=None, cap=ask.batch)
    if ask.workers is not None and ask.workers > 1:
        changes["workers"] = replace(ask, workers=None)
    if cuda and ask.placements == ("device",):
        changes["placement"] = replace(ask, placements=("streamed",))
    if cuda and len(ask.gpus) == 1 and 0 < ask.gpus[0] < len(machine.gpus):  # 0: a fixed cuda:N
        more = range(math.floor(ask.gpus[0]) + 1, len(machine.gpus) + 1)
        changes["gpus_per_worker"] = replace(ask, gpus=tuple(float(n) for n in more))
    tries = [([name], changed) for name, changed in changes.items()]
    if len(changes) > 1:
        together = {k: v for c in changes.values() for k, v in vars(c).items() if v != getattr(ask, k)}
        tries.append((list(changes), replace(ask, **together)))
    for names, changed in tries:
        _, chosen, g = _attempt(sizes, machine, threads, changed)
        if chosen is None:
            continue
        said = {
            "batch_size": f"batch_size: {chosen.batch}" if chosen.batch != ask.batch else "",
            "workers": f"workers: {chosen.fit}" if ask.workers and chosen.fit < ask.workers else "",
            "placement": f"placement: {chosen.placement}" if chosen.placement not in ask.placements else "",
            "gpus_per_worker": f"gpus_per_worker: {g:g}" if g not in ask.gpus else "",
        }
        named = [said[n] for n in names if said[n]]
        if named:
            return "; it fits with " + " and ".join(named)
    return ""


def _refusal(
    options: Sequence[Option], machine: Machine, workers: int | None, model_bytes: int, dtype: str
) -> str:
    parts = []
    for o in options:
        if machine.device == "cuda":
            per = min(machine.gpus) if machine.gpus else 0
            need = f"{size(o.memory.device + DEVICE_MARGIN)} per worker on a GPU of {size(per)}"
            if o.memory.host:
                need += f" and {size(o.memory.host + HOST_PROCESS)} of host memory"
        else:
            need = f"{size(o.memory.host + HOST_PROCESS)} of host memory per worker"
        parts.append(f"{o.placement} needs {need} ({o.fit} fit, limited by {o.limit})")
    have = f"{size(machine.host)} of host memory available"
    if machine.device == "cuda":
        have = f"{len(machine.gpus)} GPU(s), " + have
    head = (
        f"{workers} worker(s) do not fit"
        if workers and any(o.fit for o in options)
        else "the models do not fit"
    )
    return (
        f"{head} on {machine.described} ({have}; the model is {size(model_bytes)} in {dtype}): "
        + "; ".join(parts)
    )
