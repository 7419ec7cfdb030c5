"""The Merger: base weights and task vectors held once, any recipe written into one model in place."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from evomerge.errors import EvomergeError
from evomerge.merge import fused
from evomerge.merge.base import MergeInputs, MergeMethod, get_method
from evomerge.merge.kernels import STORE, Workspace, release_heap
from evomerge.merge.lines import depths, modifier_scales, rescale
from evomerge.merge.staging import HostStore, Staging
from evomerge.merge.streams import KEYED_VERSION, Stream, make_stream
from evomerge.recipe import Recipe, layer_of

StateDict = Mapping[str, torch.Tensor]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.numel() > 0
    )


SEARCH_RANDOM = "keyed"  # the random masks of every merge a run evaluates, saves or reloads
SEARCH_SEED = 0


def check_masks_reproducible(recorded: int | None, methods: Iterable[str], run_dir: Any) -> None:
    """Refuse to redraw a run's random masks (dare_*, della*) when the run recorded another version of
    the keyed stream than this evomerge draws (None: a run from before versions were recorded, 1)."""
    recorded = 1 if recorded is None else recorded
    random = sorted({m for m in methods if get_method(m).random_masks})
    if random and recorded != KEYED_VERSION:
        raise EvomergeError(
            f"run {str(run_dir)!r} drew its {', '.join(random)} masks with keyed stream v{recorded}; "
            f"this evomerge draws v{KEYED_VERSION}, so they cannot be reproduced: start a new run "
            "(recipes without random masks are unaffected)"
        )


@dataclass(frozen=True)
class Footprint:
    """Bytes a Merger holds, by place: ``device`` (accelerator memory) and ``host`` (CPU memory; all of
    a CPU Merger's bytes), and by part: ``base``, ``task_vectors``, ``staging`` (the streamed
    placement's device buffers), ``statistics`` (cached per-tensor statistics: the magnitude sketches,
    which live in host memory, and the subspace methods' SVD factors, on the merging device) and
    ``scratch`` (the workspace)."""

    device: int
    host: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.device + self.host


def _nbytes(value: Any) -> list[tuple[int, bool]]:
    """(bytes, on the host) of each tensor in one cached statistic."""
    if isinstance(value, torch.Tensor):
        return [(value.numel() * value.element_size(), value.device.type == "cpu")]
    if callable(getattr(value, "nbytes", None)):
        return [(value.nbytes(), True)]  # an OrderSketch: CPU tensors
    if isinstance(value, (tuple, list)):  # the subspace methods' SVD factors
        return [part for v in value for part in _nbytes(v)]
    return []


class Merger:
    """Holds what does not depend on the genome, so each candidate costs one pass of arithmetic.

    Kept per worker: the base (in ``dtype``, float32 by default), each expert's task vector stacked
    per tensor (``deltas[name]``, K x shape), a cache of per-tensor statistics that methods compute on
    first use or in ``prepare`` (order-statistics sketches of |delta| for TIES/breadcrumbs, norms for
    slerp/nuslerp, ...), and a workspace of scratch buffers reused by every merge.

    Placement. Each tensor's base copy and task vectors live on the device of that tensor in ``base``
    (a model loaded on a GPU, or spread over several), or all on ``device`` when given; every merge
    runs there. Experts may be lazy CPU mappings in any float dtype: each tensor is converted to
    ``dtype`` on its device one at a time. ``streamed=True`` keeps the task vectors in host memory
    instead (page-locked when the device is a GPU) and copies each tensor's K task vectors into a
    reusable device buffer just before it merges, overlapping the next tensor's copy with this merge
    on CUDA (``evomerge.merge.staging``); the weights are identical to the resident placement's.

    Memory (M: the floating weights in ``dtype``, counting tied tensors once; L: the largest floating
    tensor in ``dtype``, of n elements; see ``memory()``): resident, (K + 1) M on the device;
    streamed, M + 2 K L on a GPU (M + K L on a CPU) and K M in host memory; the output model is the
    caller's. Besides: the magnitude sketches of the TIES family in host memory (12 bytes per 256
    elements and expert: 1/85 of a float32 model per expert); the subspace methods' SVD factors on the
    merging device, in float32, at most a + b K float32 copies of each matrix (``MergeMethod.cache_models``:
    iso_c 1, tsv K, iso_cts 3, star and cart 2 K; see each method); during a merge the workspace's scratch,
    about (K + 10) float32 chunks (chunks of min(n, 2^18) elements on a CPU, min(n, 2^24) on a GPU:
    up to 0.8 GiB there), plus K n bytes of masks for eager dare/della over 2^20-element tensors (the
    fused keyed kernels need none) and one tensor in ``dtype`` when ``out`` has another dtype or
    device; where a sketch is first built (``prepare`` or first use), a sort of the largest tensor: 4 n
    bytes on a CPU, about 28 n on a GPU (``torch.sort``'s values, indices and buffers).

    ``merge``/``apply`` write into ``out`` (a state dict or module whose tensors are overwritten in
    place) or into fresh tensors. Non-floating tensors (buffers such as position ids) are copied from
    the base; tensors the base shares storage with (tied embeddings) are merged once.

    ``base=None`` merges the experts as they are (a zero base), for methods that accept no base.
    ``seed`` seeds the random masks of dare_*/della*: every merge draws from a fresh generator seeded
    with it, so one recipe always gives the same weights, and the draws equal mergekit's after
    ``torch.manual_seed(seed)``. ``seed=None`` draws from torch's global generator, as mergekit does;
    a ``torch.Generator`` is drawn from as it is. These draws are made on the CPU whatever the device
    (a generator on the tensors' device draws there). ``random="keyed"`` draws the same distribution
    from a counter-based hash of (seed, tensor, expert, element), the same on every device: a tensor's
    masks are independent of the rest of the recipe, and dare_ties/dare_linear run as one fused
    compiled kernel per tensor (``evomerge.merge.fused``), the fast path the search's workers use.
    """

    def __init__(
        self,
        base: StateDict | None,
        experts: Mapping[Any, StateDict],
        dtype: torch.dtype = torch.float32,
        *,
        seed: int | torch.Generator | None = 0,
        random: Literal["mergekit", "keyed"] = "mergekit",
        device: str | torch.device | None = None,
        streamed: bool = False,
    ):
        if not experts:
            raise EvomergeError("a merge needs at least one expert model")
        self.experts = list(experts)
        self.dtype = dtype
        self.seed = seed
        self.random = random
        self.streamed = streamed
        make_stream(random, seed)  # refuse a bad combination now
        self.zero_base = base is None
        self.base: dict[str, torch.Tensor] = {}
        # task vectors: on each tensor's device, or (streamed) in host memory
        self.deltas: dict[str, torch.Tensor] = {}
        self.devices: dict[str, torch.device] = {}  # where each tensor merges
        self.aliases: dict[str, str] = {}  # name -> the earlier name whose storage it shares
        self.cache: dict[str, dict[Any, Any]] = {}
        self.workspace = Workspace()
        self.host: HostStore | None = None
        self.staging: Staging | None = None
        override = torch.device(device) if device is not None else None
        k = len(self.experts)
        first = experts[self.experts[0]] if base is None else base
        self.names = list(first)
        storages: dict[tuple[Any, ...], str] = {}  # (data_ptr, shape, stride, dtype) -> first name
        for name in self.names:
            b = first[name]  # read once: a lazy mapping loads each tensor once
            key = (b.data_ptr(), tuple(b.shape), b.stride(), b.dtype)
            if b.numel() and key in storages:
                self.aliases[name] = storages[key]
                continue
            storages[key] = name
            dev = override if override is not None else b.device
            if b.is_floating_point():
                if base is None:
                    kept = torch.zeros((), dtype=dtype, device=dev).expand(b.shape)
                else:
                    kept = torch.empty(b.shape, dtype=dtype, device=dev).copy_(b.detach())
                self.base[name] = kept
                self.devices[name] = kept.device
                if not streamed:
                    self.deltas[name] = torch.empty((k, *b.shape), dtype=dtype, device=kept.device)
                self.cache[name] = {}
            else:
                self.base[name] = b.detach().to(device=dev, copy=True)
            del b
        del storages
        if streamed:
            shapes = {name: (k, *self.base[name].shape) for name in self.devices}
            pin = any(d.type == "cuda" for d in self.devices.values())
            self.host = HostStore(shapes, dtype, pin)
            self.deltas = dict(self.host.views)
            self.staging = Staging(self.deltas, self.devices)
        self.depths = depths(self.devices)  # the relative depth of each merged tensor (lines)
        self.fuse = fused.worth_compiling(max((t.numel() for t in self.base.values()), default=0))
        # Experts are read one at a time, so a lazy mapping keeps only one expert in memory at once,
        # and each of its tensors is converted to the compute dtype on its device alone.
        for i, e in enumerate(self.experts):
            sd = experts[e]
            extra = set(sd) - set(self.base) - set(self.aliases)
            if extra:
                raise EvomergeError(f"expert {e!r} has tensors the base lacks: {sorted(extra)[:5]}")
            for name, b in self.base.items():
                if name not in sd:
                    raise EvomergeError(f"expert {e!r} has no tensor {name!r} that the base has")
                t = sd[name]
                if t.shape != b.shape:
                    raise EvomergeError(
                        f"expert {e!r} tensor {name!r} has shape {tuple(t.shape)}, base has {tuple(b.shape)}"
                    )
                if name in self.deltas:
                    self._store_delta(name, i, t)
                del t
            for name, owner in self.aliases.items():
                if (
                    name in sd
                    and not _same_storage(sd[name], sd[owner])
                    and not torch.equal(sd[name], sd[owner])
                ):
                    raise EvomergeError(
                        f"expert {e!r} has different tensors {name!r} and {owner!r}, which the base ties"
                    )
            del sd

    def _store_delta(self, name: str, i: int, t: torch.Tensor) -> None:
        """Expert i's task vector of tensor ``name``: its tensor in the compute dtype minus the base,
        subtracted on the tensor's device and written where the task vectors are kept."""
        b = self.base[name]
        src = t.detach().to(device=b.device)
        if src.dtype != self.dtype:
            src = src.to(self.dtype)
        dest = self.deltas[name][i]
        if dest.device == b.device:
            torch.sub(src, b, out=dest)
        else:  # streamed from a GPU: subtract there, keep the result in host memory
            dest.copy_(torch.sub(src, b))

    def changed_layers(self) -> set[int | None]:
        """The decoder layers (None: the tensors outside the layers) in which some expert differs from
        the base. A LoRA fine-tune, for one, leaves the embeddings and norms as they were."""
        return {layer_of(name) for name, d in self.deltas.items() if bool(d.any())}

    def nbytes(self) -> int:
        """Bytes held: base, task vectors, staging buffers, cached statistics and scratch."""
        return self.memory().total

    def memory(self) -> Footprint:
        """Bytes held, by place (device, host) and by part; see ``Footprint``."""
        parts = dict.fromkeys(("base", "task_vectors", "staging", "statistics", "scratch"), 0)
        place = {"device": 0, "host": 0}

        def add(part: str, nbytes: int, host: bool) -> None:
            parts[part] += nbytes
            place["host" if host else "device"] += nbytes

        for t in self.base.values():
            add("base", t.untyped_storage().nbytes(), t.device.type == "cpu")
        if self.host is not None:
            add("task_vectors", self.host.nbytes(), True)
        else:
            for t in self.deltas.values():
                add("task_vectors", t.numel() * t.element_size(), t.device.type == "cpu")
        if self.staging is not None:
            add("staging", self.staging.nbytes("cpu"), True)
            add("staging", self.staging.nbytes() - self.staging.nbytes("cpu"), False)
        for c in self.cache.values():
            for v in c.values():
                for nbytes, host in _nbytes(v):
                    add("statistics", nbytes, host)
        cpu = self.workspace.nbytes("cpu")
        add("scratch", cpu, True)
        add("scratch", self.workspace.nbytes() - cpu, False)
        return Footprint(place["device"], place["host"], parts)

    def inputs(self, name: str, out: torch.Tensor | None = None, stream: Stream | None = None) -> MergeInputs:
        """The MergeInputs of one tensor, with this Merger's cache and workspace (streamed: with a
        fresh device copy of its task vectors)."""
        deltas = self.staging.fetch(name) if self.staging is not None else self.deltas[name]
        return self._inputs(name, deltas, out, stream)

    def _inputs(
        self,
        name: str,
        deltas: torch.Tensor,
        out: torch.Tensor | None = None,
        stream: Stream | None = None,
        workspace: Workspace | None = None,
    ) -> MergeInputs:
        return MergeInputs(
            name,
            self.base[name],
            deltas,
            out=out,
            cache=self.cache[name],
            workspace=self.workspace if workspace is None else workspace,
            stream=stream,
            fuse=self.fuse,
            depth=self.depths[name],
        )

    def _task_vectors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, task vectors on the tensor's device) in order: resident ones as they are, streamed
        ones through the staging buffers (each valid until the next but one is asked for)."""
        if self.staging is None:
            return ((name, self.deltas[name]) for name in names)
        return self.staging.stream(names)

    def prepare(self, methods: Iterable[str]) -> None:
        """Compute now, for every tensor, the statistics ``methods`` would compute on first use.

        Tensors on a CPU are prepared in parallel on ``torch.get_num_threads()`` threads (the sorts
        behind the order-statistics sketches release the GIL), each with its own scratch space;
        tensors on other devices one after another (their kernels run on the device)."""
        hooks = []
        for m in dict.fromkeys(methods):
            method = get_method(m)
            if method.prepare is not None and method.prepare not in hooks:
                hooks.append(method.prepare)
        if not hooks:
            return

        def run(name: str, deltas: torch.Tensor, workspace: Workspace) -> None:
            x = self._inputs(name, deltas, workspace=workspace)
            for hook in hooks:
                hook(x)

        names = sorted(self.deltas, key=lambda n: -self.deltas[n].numel())
        on_cpu = [n for n in names if self.devices[n].type == "cpu"]
        elsewhere = [n for n in self.deltas if self.devices[n].type != "cpu"]
        threads = torch.get_num_threads()
        serial = elsewhere + (on_cpu if threads <= 1 else [])
        for name, deltas in self._task_vectors(serial):
            run(name, deltas, self.workspace)
        if serial:
            self.workspace.release("sort")  # the largest tensor's sort buffer is not needed again
            release_heap()
        if threads <= 1 or not on_cpu:
            return
        spaces = [Workspace() for _ in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            free = list(range(threads))
            lock = threading.Lock()

            def task(name: str) -> None:
                with lock:
                    slot = free.pop()
                try:
                    space = spaces[slot]
                    deltas = self.deltas[name]
                    if self.streamed:  # a copy in this thread's scratch, as the staging buffer holds it
                        stage = space.buf("stage", deltas.numel(), deltas.dtype).view(deltas.shape)
                        deltas = stage.copy_(deltas)
                    run(name, deltas, space)
                finally:
                    with lock:
                        free.append(slot)

            list(pool.map(task, on_cpu))
        release_heap()

    def merge(self, method: str, parameters: Mapping[str, Any], out: Any = None) -> dict[str, torch.Tensor]:
        """Merge every tensor with one method; see ``apply`` for per-layer recipes."""
        return self.apply(Recipe.uniform(method, parameters), out=out)

    def apply(self, recipe: Recipe, out: Any = None) -> dict[str, torch.Tensor]:
        """Write the recipe's merged weights into ``out`` (state dict or module, in place) and return them.
        A group with a ``lines`` modifier has its method's merged task vector scaled by the depth factor
        (``evomerge.merge.lines.rescale``)."""
        target = out.state_dict() if isinstance(out, torch.nn.Module) else out
        resolved: dict[str, tuple[MergeMethod, dict[str, Any], tuple[float, float] | None]] = {}
        for g in recipe.groups:
            method = get_method(g.method)
            if self.zero_base and method.base == "required":
                raise EvomergeError(f"merge method {method.name!r} needs a base model")
            scales = None if g.lines is None else modifier_scales(g.name, g.lines)
            if scales is not None and self.zero_base:
                raise EvomergeError(
                    f"group {g.name!r} lines modifier scales task vectors: it needs a base model"
                )
            resolved[g.name] = (method, method.resolve(g.parameters, self.experts), scales)
        stream = make_stream(self.random, self.seed)
        result: dict[str, torch.Tensor] = {}
        task_vectors = self._task_vectors([n for n in self.base if n in self.deltas])
        try:
            with torch.no_grad():
                for name, base_t in self.base.items():
                    dest = target[name] if target is not None else None
                    if name not in self.deltas:
                        merged = base_t
                    else:
                        staged, deltas = next(task_vectors)
                        assert staged == name
                        method, params, scales = resolved[recipe.group_for(name).name]
                        direct = (
                            dest is not None
                            and dest.dtype == self.dtype
                            and dest.device == base_t.device
                            and dest.shape == base_t.shape
                            and dest.is_contiguous()
                        )
                        x = self._inputs(name, deltas, dest if direct else None, stream)
                        merged = method.fn(x, **params)
                        if scales is not None:  # LiNeS on top of the method (the group's lines modifier)
                            merged = rescale(x, merged, *scales)
                    if dest is not None:
                        if merged is not dest:
                            dest.copy_(merged)
                        merged = dest
                    result[name] = merged
                for name, owner in self.aliases.items():
                    if target is not None and not _same_storage(target[name], target[owner]):
                        target[name].copy_(result[owner])
                        result[name] = target[name]
                    else:
                        result[name] = result[owner]
        finally:
            close = getattr(task_vectors, "close", None)
            if close is not None:
                close()
        self.workspace.release_large(STORE)  # masks of the largest tensors: not kept between merges
        release_heap()
        return {name: result[name] for name in self.names}
