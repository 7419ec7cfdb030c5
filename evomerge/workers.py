"""Evaluation workers: each keeps the base and the task vectors in memory and merges candidates into
one preallocated model in place; never writes a candidate to disk. Ray actors run them in parallel."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from evomerge.fitness import make_fitness
from evomerge.fitness.python import FitnessOutputError
from evomerge.merge import Merger
from evomerge.merge.kernels import limit_heap_fragmentation
from evomerge.merge.merger import SEARCH_RANDOM, SEARCH_SEED
from evomerge.models import ModelSet, save_hf
from evomerge.recipe import Recipe


@dataclass
class Job:
    """One evaluation: a recipe on a split, with the items to use (None: all). ``record`` holds the
    store fields that say why it was asked for (kind, generation, genome, label)."""

    key: Any
    recipe: dict[str, Any]
    split: str
    items: dict[str, list[int]] | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def subset(self) -> str | None:
        """A key of the items (None: the whole split): evaluations are reused only on the same items."""
        if self.items is None:
            return None
        return hashlib.sha1(json.dumps(self.items, sort_keys=True).encode()).hexdigest()[:12]


def search_merger(model: torch.nn.Module, models: ModelSet) -> Merger:
    """The Merger of a run's candidates (workers, ``Run.load_model``): keyed random masks, so the fused
    dare kernels run and a tensor's masks do not depend on the rest of the recipe."""
    return Merger(model.state_dict(), models.expert_state_dicts(), seed=SEARCH_SEED, random=SEARCH_RANDOM)


class Evaluator:
    """Merges recipes into one model and scores them. Runs in a Ray actor or in-process."""

    def __init__(self, models: dict[str, Any], fitness: dict[str, Any], threads: int = 1):
        torch.set_num_threads(threads)
        limit_heap_fragmentation()  # this process merges thousands of times
        self.models = ModelSet(**models)
        self.model = self.models.load_model()
        self.tokenizer = self.models.load_tokenizer()
        self.merger = search_merger(self.model, self.models)
        self.fitness = make_fitness(**fitness)
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def materialize(self, recipe: dict[str, Any]) -> torch.nn.Module:
        """Write the recipe's weights into the worker's model; refuse non-finite results.

        The check is one sum per tensor (NaN and inf propagate through it), ~35x cheaper than
        ``isfinite(p).all()``; it also refuses a tensor whose sum overflows, i.e. absurd weights."""
        self.merger.apply(Recipe.from_dict(recipe), out=self.model)
        for name, p in self.model.state_dict().items():
            if p.is_floating_point() and not math.isfinite(float(p.sum())):
                raise FloatingPointError(f"merge produced NaN/inf in tensor {name!r}")
        return self.model

    def evaluate(self, job: Job) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            model = self.materialize(job.recipe)
            with torch.no_grad():
                result = self.fitness.evaluate(model, self.tokenizer, job.split, job.items)
            bad = [k for k, v in result.values.items() if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"fitness returned non-finite values for {bad}")
            out = {"status": "ok", "error": None, **asdict(result)}
        except FitnessOutputError as e:  # the user's function is wrong: every candidate would fail
            out = {"status": "failed", "error": str(e), "fatal": True}
        except Exception as e:  # a failed candidate is a record with its reason, never a gap
            out = {"status": "failed", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        out.update(wall_s=time.perf_counter() - start, worker=self.name)
        return out

    def changed_layers(self) -> list[int | None]:
        return sorted(self.merger.changed_layers(), key=lambda layer: -1 if layer is None else layer)

    def n_items(self, split: str) -> dict[str, int]:
        return self.fitness.n_items(split)

    def save(self, recipe: dict[str, Any], path: str) -> str:
        """Save the merged model and the tokenizer as an HF folder (safetensors)."""
        save_hf(path, self.materialize(recipe), self.tokenizer)
        return path


class WorkerPool:
    """``workers`` Ray actors, each an Evaluator; ``run(jobs)`` yields (job, result) as each finishes."""

    def __init__(
        self,
        models: dict[str, Any],
        fitness: dict[str, Any],
        workers: int,
        threads: int = 1,
        address: str | None = None,
        retries: int = 1,
    ):
        import ray

        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=max(workers * threads, os.cpu_count() or 1),
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
        self.ray = ray
        self.retries = retries
        self._new = lambda: ray.remote(num_cpus=threads)(Evaluator).remote(models, fitness, threads)
        self.actors = [self._new() for _ in range(workers)]

    def call(self, method: str, *args: Any) -> Any:
        """Run a method on the first worker and wait for it."""
        return self.ray.get(getattr(self.actors[0], method).remote(*args))

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
        """Evaluate jobs on idle workers; yield (job, result) as each finishes.

        A failed evaluation (a dead worker, NaN weights, an exception) is retried up to ``retries``
        times, on another worker when there is one; a dead worker is replaced by a fresh one. The
        result says how many ``attempts`` it took."""
        from ray.exceptions import RayActorError, WorkerCrashedError

        pending: deque[tuple[Job, int, int | None]] = deque((job, 0, None) for job in jobs)
        running: dict[Any, tuple[Job, int, int]] = {}
        idle = list(range(len(self.actors)))
        while pending or running:
            while pending and idle:
                job, attempt, last = pending.popleft()
                slot = next((s for s in idle if s != last), idle[0])
                idle.remove(slot)
                running[self.actors[slot].evaluate.remote(job)] = (job, attempt, slot)
            done, _ = self.ray.wait(list(running), num_returns=1)
            job, attempt, slot = running.pop(done[0])
            try:
                result = self.ray.get(done[0])
            except (RayActorError, WorkerCrashedError) as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
                result = {"status": "failed", "error": f"worker died ({type(e).__name__}): {reason}"[:500]}
                result.update(wall_s=0.0, worker=f"worker-{slot}")
                self.ray.kill(self.actors[slot])
                self.actors[slot] = self._new()
            idle.append(slot)
            if result["status"] != "ok" and not result.get("fatal") and attempt < self.retries:
                pending.appendleft((job, attempt + 1, slot))
                continue
            result["attempts"] = attempt + 1
            yield job, result

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
