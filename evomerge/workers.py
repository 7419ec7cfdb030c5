"""Workers: each keeps the base and the task vectors in memory, merges candidates into one
preallocated model in place and scores them; never writes a candidate to disk. ``WorkerPool`` runs them
as Ray actors: it dispatches jobs to idle workers, retries failed evaluations, replaces dead or hung
workers."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.fitness import make_fitness
from evomerge.fitness.python import FitnessOutputError
from evomerge.flow import flow_model, flow_sources, standalone
from evomerge.jobs import EvalResult, Job
from evomerge.merge import Merger
from evomerge.merge.kernels import limit_heap_fragmentation
from evomerge.merge.merger import SEARCH_RANDOM, SEARCH_SEED
from evomerge.models import ModelSet, save_hf
from evomerge.objectives import depth_values
from evomerge.plan import size
from evomerge.recipe import Recipe
from evomerge.store import Status


def search_merger(model: torch.nn.Module, models: ModelSet, streamed: bool = False) -> Merger:
    """The Merger of a run's candidates (workers, ``Run.load_model``): keyed random masks, so the fused
    dare kernels run and a tensor's masks do not depend on the rest of the recipe. It holds each tensor
    where ``model`` has it, in the models' compute dtype; ``streamed`` keeps the task vectors in pinned
    host memory instead."""
    base = model.state_dict()
    return Merger(
        base,
        models.expert_state_dicts(base),
        models.torch_dtype,
        seed=SEARCH_SEED,
        random=SEARCH_RANDOM,
        streamed=streamed,
    )


@dataclass(frozen=True)
class Where:
    """Where a worker holds its models: ``device`` (cpu, cuda: the GPU(s) Ray gave it, cuda:N),
    ``placement`` (device, streamed, host), ``gpus`` it was given and the device memory the plan says
    it needs (None: unknown)."""

    device: str = "cpu"
    placement: str = "host"
    gpus: float = 0.0
    need: int | None = None

    def torch_device(self) -> str:
        """The device the worker loads onto: Ray exposes a worker's GPUs to it as cuda:0, cuda:1, ...;
        a worker given several spreads its model over them (``auto``)."""
        if self.device == "cpu":
            return "cpu"
        if not torch.cuda.is_available():
            raise EvomergeError(
                f"device is {self.device} but torch {torch.__version__} on {os.uname().nodename} sees no GPU"
            )
        if self.device.startswith("cuda:"):
            return self.device
        return "auto" if self.gpus > 1 else "cuda:0"

    def check_memory(self) -> None:
        """Refuse, before loading, a GPU too small for the plan's share of it (a worker given 0.5 of a
        GPU may use half of its memory)."""
        if self.need is None or self.device == "cpu":
            return
        index = int(self.device.split(":")[1]) if self.device.startswith("cuda:") else 0
        props = torch.cuda.get_device_properties(index)
        share = int(props.total_memory * min(1.0, self.gpus or 1.0) * max(1, int(self.gpus)))
        if self.need > share:
            raise EvomergeError(
                f"the {self.placement} placement needs {size(self.need)} of GPU memory per worker; "
                f"{props.name} on {os.uname().nodename} gives this worker {size(share)}"
            )


def _ray_node() -> str:
    """``<Ray node id prefix>:`` inside a Ray worker (nodes of one cluster may share a host name)."""
    import sys

    if "ray" not in sys.modules:
        return ""
    import ray

    if not ray.is_initialized():
        return ""
    return f"{ray.get_runtime_context().get_node_id()[:8]}:"


class Worker:
    """Merges recipes into one model and scores them. Runs in a Ray actor or in-process."""

    def __init__(
        self, models: dict[str, Any], fitness: dict[str, Any], threads: int = 1, where: Where | None = None
    ):
        torch.set_num_threads(threads)
        limit_heap_fragmentation()  # this process merges thousands of times
        self.where = where or Where()
        device = self.where.torch_device()
        self.where.check_memory()
        self.models = ModelSet(**models)
        self.model = self.models.load_model(device=device)
        self.tokenizer = self.models.load_tokenizer()
        self.merger = search_merger(self.model, self.models, streamed=self.where.placement == "streamed")
        self.fitness = make_fitness(**fitness)
        self.name = f"{os.uname().nodename}:{_ray_node()}{os.getpid()}"
        self.held: dict[str, torch.nn.ModuleList] = {}  # data-flow sources: layers of the base, experts

    def materialize(self, recipe: Recipe) -> torch.nn.Module:
        """The recipe's model: its parameter-space merge written into the worker's model, and for a data
        flow a model whose layers are references to the layers of the merge and the held models
        (``evomerge.flow.flow_model``: no weights copied)."""
        self._merge(recipe)
        if recipe.flow is None:
            return self.model
        return flow_model(self.model, self._sources(recipe), recipe.flow)

    def _sources(self, recipe: Recipe) -> dict[str, Any]:
        """The layers a data flow names: the merge's (the worker's model) and those of the base and
        experts, each held from its first use on (one model's decoder layers each)."""
        return flow_sources(self.model, self.merger, recipe.flow or (), list(self.models.experts), self.held)

    def _merge(self, recipe: Recipe) -> None:
        """Write the recipe's weights into the worker's model; refuse non-finite results.

        The check is one sum per tensor (NaN and inf propagate through it), ~35x cheaper than
        ``isfinite(p).all()``; it also refuses a tensor whose sum overflows, i.e. absurd weights. The
        sums stay on the device until one read of them all (a GPU waits once per merge, not per tensor)."""
        self.merger.apply(recipe, out=self.model)
        weights = {name: p for name, p in self.model.state_dict().items() if p.is_floating_point()}
        first = next(iter(weights.values())).device
        sums = torch.stack([p.sum(dtype=torch.float32).to(first) for p in weights.values()])
        finite = sums.isfinite().tolist()
        if not all(finite):
            raise FloatingPointError(
                f"merge produced NaN/inf in tensor {list(weights)[finite.index(False)]!r}"
            )

    def evaluate(self, job: Job) -> EvalResult:
        start = time.perf_counter()
        try:
            model = self.materialize(job.recipe)
            with torch.no_grad():
                if job.adaptive:
                    out = self._adaptive(model, job)
                else:
                    result = self.fitness.evaluate(model, self.tokenizer, job.split, job.items)
                    bad = [k for k, v in result.values.items() if not math.isfinite(v)]
                    if bad:
                        raise FloatingPointError(f"fitness returned non-finite values for {bad}")
                    out = EvalResult(Status.OK, **asdict(result))
            out.values.update(depth_values(job.recipe))  # objectives `of: depth`
        except FitnessOutputError as e:  # the user's function is wrong: every candidate would fail
            out = EvalResult.failed(str(e), fatal=True)
        except Exception as e:  # a failed candidate is a record with its reason, never a gap
            out = EvalResult.failed(f"{type(e).__name__}: {e}", trace=traceback.format_exc())
        out.wall_s, out.worker = time.perf_counter() - start, self.name
        return out

    def _adaptive(self, model: torch.nn.Module, job: Job) -> EvalResult:
        """Score the job's objectives by adaptive tests, a batch of items per fitness call."""
        from evomerge.adaptive import adaptive_evaluate

        n_tokens = 0
        outputs: dict[str, dict[str, str]] = {}

        def ask(items: dict[str, list[int]]) -> dict[str, dict[str, float]]:
            nonlocal n_tokens
            result = self.fitness.evaluate(model, self.tokenizer, job.split, items)
            n_tokens += result.n_tokens
            for task, answers in result.outputs.items():
                outputs.setdefault(task, {}).update(answers)
            return result.responses or {}

        scores, answered = adaptive_evaluate(job.adaptive, ask, job.race)
        values = {f"{name}_se": s.se for name, s in scores.items()}
        values |= {name: s.estimate for name, s in scores.items()}
        n = sum(len(v) for v in answered.values())
        return EvalResult(
            Status.OK,
            values=values,
            responses=answered,
            n_items=n,
            n_tokens=n_tokens,
            adaptive=scores,
            outputs=outputs or None,
        )

    def ready(self) -> str:
        """Answers once the worker has loaded its models."""
        return self.name

    def placement(self) -> dict[str, Any]:
        """Where this worker runs: its name, the GPU ids Ray gave it, its model's device(s), its placement."""
        gpu_ids = []
        if _ray_node():
            import ray

            gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        devices = sorted({str(p.device) for p in self.model.parameters()})
        return {
            "worker": self.name,
            "gpu_ids": gpu_ids,
            "devices": devices,
            "placement": self.where.placement,
        }

    def changed_layers(self) -> list[int | None]:
        return sorted(self.merger.changed_layers(), key=lambda layer: -1 if layer is None else layer)

    def n_items(self, split: str) -> dict[str, int]:
        return self.fitness.n_items(split)

    def prepare(self, splits: list[str]) -> dict[str, dict[str, int]]:
        """Load the fitness for ``splits`` (its tasks and their data): a run asks before it stores
        anything, so a setup that cannot score is refused without leaving a run folder."""
        return {split: self.fitness.n_items(split) for split in splits}

    def save(self, recipe: Recipe, path: str) -> str:
        """Save the merged model and the tokenizer as an HF folder (safetensors); a data flow's model
        with its layers copied (``evomerge.flow.standalone``)."""
        model = self.materialize(recipe)
        if recipe.flow is not None:  # copied to host memory: a GPU holds one model per worker
            model = standalone(self.model, self._sources(recipe), recipe.flow, device="cpu")
        save_hf(path, model, self.tokenizer)
        return path


# fitness.timeout "auto": no limit is known before an evaluation of its kind has finished, so the first
# ones get FIRST_TIMEOUT_S; after that, TIMEOUT_FACTOR x the slowest finished evaluation of the same kind
# (split, item subset or whole split), at least MIN_TIMEOUT_S.
FIRST_TIMEOUT_S = 1800.0
TIMEOUT_FACTOR = 10.0
MIN_TIMEOUT_S = 60.0


class Timeouts:
    """Seconds an evaluation may take before it counts as hung: fixed, none, or derived ("auto")."""

    def __init__(self, setting: float | str | None):
        self.setting = setting
        self.slowest: dict[tuple[str, bool], float] = {}

    def limit(self, job: Job) -> float | None:
        if self.setting is None or isinstance(self.setting, (int, float)):
            return self.setting
        seen = self.slowest.get((job.split, job.items is None))
        return FIRST_TIMEOUT_S if seen is None else max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * seen)

    def finished(self, job: Job, wall_s: float) -> None:
        key = (job.split, job.items is None)
        self.slowest[key] = max(self.slowest.get(key, 0.0), wall_s)


@contextlib.contextmanager
def quiet_ray() -> Iterator[None]:
    """Ray's start-up warnings (its token-authentication banner) are not the user's business."""
    logger = logging.getLogger("ray")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _signals_after_init() -> Iterator[None]:
    """ray.init with SIGINT and SIGTERM held back until it returns, then handed to the caller's handlers
    (a second one goes through at once). A handler's exception raised within ray.init can land in the
    middle of the compiled code that builds the driver's CoreWorker: the half-built one then crashes the
    process as it exits (SIGSEGV). ray.init also replaces the SIGTERM handler with an exit; the caller's
    (a clean stop) stays."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old = {s: h for s, h in old.items() if h is not None}  # None: a handler not set from Python
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if held and callable(old[signum]):  # a second one: the caller's handler now
            held.clear()
            old[signum](signum, frame)
        else:
            held.append(signum)

    for s in old:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if held:
            signal.raise_signal(held[0])


class WorkerPool:
    """``workers`` Ray actors, each a Worker; ``run(jobs)`` yields (job, result) as each finishes.

    ``timeout`` (seconds, ``"auto"`` or None) turns an evaluation that takes longer into a failed one
    ("timed out after N s"); its worker is killed and replaced. A timed-out evaluation is not retried:
    a hang is rarely transient."""

    def __init__(
        self,
        models: dict[str, Any],
        fitness: dict[str, Any],
        workers: int | str,
        threads: int = 1,
        address: str | None = None,
        retries: int = 1,
        timeout: float | str | None = "auto",
        where: Where | None = None,
    ):
        import ray

        where = where or Where()

        if not ray.is_initialized():
            with quiet_ray(), _signals_after_init():
                if address:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
                else:
                    ray.init(
                        address="local",  # a Ray of its own, even where `ray start` left one running
                        num_cpus=max(
                            (workers if isinstance(workers, int) else 1) * threads, os.cpu_count() or 1
                        ),
                        include_dashboard=False,
                        log_to_driver=False,
                        configure_logging=False,
                    )
        self.ray = ray
        self.retries = retries
        self.timeouts = Timeouts(timeout)
        workers = gpu_slots(ray, where.gpus, workers) if where.gpus else workers
        if workers == "auto":
            workers = max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
        self.where = where
        remote = ray.remote(num_cpus=threads, num_gpus=where.gpus)(Worker)
        self._new = lambda: remote.remote(models, fitness, threads, where)
        self.actors = [self._new() for _ in range(workers)]
        # ready() of the workers still loading their models -> their slot
        self.starting: dict[Any, int] = {a.ready.remote(): slot for slot, a in enumerate(self.actors)}

    def call(self, method: str, *args: Any) -> Any:
        """Run a method on the first worker and wait for it; a worker that cannot start (its models or
        its fitness do not load) is one line naming the cause."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return self.ray.get(getattr(self.actors[0], method).remote(*args))
        except RayActorError as e:
            raise EvomergeError(f"a worker could not start: {_cause(e)}") from None
        except RayTaskError as e:  # the setup's failure (its fitness data, say), not a candidate's
            cause = _cause(e).removeprefix("EvomergeError: ")
            raise EvomergeError(f"a worker could not {method.replace('_', ' ')}: {cause}") from None

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, EvalResult]]:
        """Evaluate jobs on idle workers; yield (job, result) as each finishes.

        A failed evaluation (a dead worker, NaN weights, an exception) is retried up to ``retries``
        times, on another worker when there is one; a dead worker is replaced by a fresh one. A worker
        gets jobs once it has loaded its models, so an evaluation's time limit never counts the load.
        The result says how many ``attempts`` it took."""
        from ray.exceptions import RayActorError, WorkerCrashedError

        pending: deque[tuple[Job, int, int | None]] = deque((job, 0, None) for job in jobs)
        running: dict[Any, tuple[Job, int, int, float]] = {}
        idle = [s for s in range(len(self.actors)) if s not in self.starting.values()]
        while pending or running:
            while pending and idle:
                job, attempt, last = pending.popleft()
                slot = next((s for s in idle if s != last), idle[0])
                idle.remove(slot)
                running[self.actors[slot].evaluate.remote(job)] = (job, attempt, slot, time.monotonic())
            for ref, (job, attempt, slot, result) in self._next_done(running):
                if job is None:  # a worker finished loading (or failed to: its first job will say why)
                    idle.append(slot)
                    continue
                if ref is not None:
                    try:
                        result = self.ray.get(ref)
                    except (RayActorError, WorkerCrashedError) as e:
                        result = EvalResult.failed(
                            f"worker died ({type(e).__name__}): {_cause(e)}"[:500], f"worker-{slot}"
                        )
                        self._replace(slot)
                if slot not in self.starting.values():
                    idle.append(slot)
                if result.ok:
                    self.timeouts.finished(job, result.wall_s)
                retry = not (result.fatal or result.timed_out)
                if not result.ok and retry and attempt < self.retries:
                    pending.appendleft((job, attempt + 1, slot))
                    continue
                result.attempts = attempt + 1
                yield job, result

    def _next_done(self, running: dict[Any, tuple[Job, int, int, float]]) -> list[tuple[Any, tuple]]:
        """Wait for the next finished evaluation or started worker, or for the first evaluation to pass
        its time limit. Returns (ref, (job, attempt, slot, None)) for a finished evaluation,
        (None, (job, attempt, slot, result)) for a timed-out one, whose worker is then replaced, and
        (ref, (None, 0, slot, None)) for a worker that has started."""
        now = time.monotonic()
        deadlines = {}
        for ref, (job, _, _, start) in running.items():
            limit = self.timeouts.limit(job)
            if limit is not None:
                deadlines[ref] = (start + limit, limit)
        wait = None if not deadlines else max(0.0, min(d for d, _ in deadlines.values()) - now)
        done, _ = self.ray.wait([*running, *self.starting], num_returns=1, timeout=wait)
        if done and done[0] in self.starting:
            slot = self.starting.pop(done[0])
            with contextlib.suppress(Exception):
                self.ray.get(done[0])
            return [(done[0], (None, 0, slot, None))]
        if done:
            job, attempt, slot, _ = running.pop(done[0])
            return [(done[0], (job, attempt, slot, None))]
        now = time.monotonic()
        out = []
        for ref, (deadline, limit) in deadlines.items():
            if now >= deadline:
                job, attempt, slot, start = running.pop(ref)
                result = EvalResult.failed(
                    f"timed out after {limit:.0f} s", f"worker-{slot}", now - start, timed_out=True
                )
                self._replace(slot)
                out.append((None, (job, attempt, slot, result)))
        return out

    def _replace(self, slot: int) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[slot])
        self.actors[slot] = self._new()
        self.starting[self.actors[slot].ready.remote()] = slot

    def shutdown(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):  # an actor already dead, or Ray already stopped
                self.ray.kill(a)
        self.actors = []


def gpu_slots(ray: Any, gpus: float, workers: int | str) -> int:
    """How many workers of ``gpus`` GPUs each the Ray cluster's nodes hold (``workers: auto``), or
    ``workers`` after checking that they fit: Ray would otherwise leave the rest waiting for GPUs that
    never come. One line with the numbers when they do not."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    per_node = [int(r.get("GPU", 0) / gpus + 1e-9) for r in nodes]
    most = max((r.get("GPU", 0) for r in nodes), default=0)
    if gpus > most:
        raise EvomergeError(
            f"gpus_per_worker is {gpus:g} but no node of the Ray cluster has more than {most:g} GPU(s); "
            f"use gpus_per_worker: {most:g} or less" + (" (or device: cpu)" if not most else "")
        )
    slots = sum(per_node)
    if workers == "auto":
        return slots
    if workers > slots:
        total = sum(r.get("GPU", 0) for r in nodes)
        raise EvomergeError(
            f"workers: {workers} with gpus_per_worker {gpus:g} need {workers * gpus:g} GPUs; the Ray cluster "
            f"has {total:g} on {len(nodes)} node(s), room for {slots} worker(s): set workers: auto or {slots}, "
            f"or a smaller gpus_per_worker"
        )
    return workers


def _cause(e: BaseException) -> str:
    """The line of a Ray error that says why: the innermost exception raised in the worker (for a
    worker that failed to start, the error of its creation), else the error's first line."""
    import re

    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    raised = [x for x in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b.*: ", x)]
    if raised:
        name, _, message = raised[-1].partition(": ")
        return f"{name.rsplit('.', 1)[-1]}: {message}"
    return lines[0] if lines else type(e).__name__
