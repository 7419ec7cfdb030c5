"""The search: pymoo's ask/tell loop over genomes, candidates scored in parallel by workers, every
result written to the store as it arrives, the algorithm checkpointed after each generation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from evomerge import report
from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.fitness import check_tasks
from evomerge.models import ModelSet
from evomerge.recipe import Recipe
from evomerge.searchspace import SearchSpace
from evomerge.store import Candidate, Store
from evomerge.workers import Job, WorkerPool

FAILED_F = 1e6  # what the algorithm sees for a failed candidate: worse than any real objective


def make_algorithm(config: RunConfig) -> Any:
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.algorithms.soo.nonconvex.ga import GA

    cls = {"ga": GA, "nsga2": NSGA2}[config.algorithm.name]
    try:
        return cls(pop_size=config.algorithm.pop_size, **config.algorithm.options)
    except TypeError as e:
        raise EvomergeError(f"algorithm {config.algorithm.name!r}: bad option ({e})") from None


def reference_recipes(experts: list[str]) -> dict[str, Recipe]:
    """Recipes whose merge is exactly the base or one expert, so references go through the same path."""
    refs = {"base": Recipe.uniform("task_arithmetic", {"weight": 0.0})}
    for e in experts:
        refs[e] = Recipe.uniform("linear", {"weight": {x: float(x == e) for x in experts}})
    return refs


def choose_items(n_items: dict[str, int], items: int | None, seed: int) -> dict[str, list[int]] | None:
    """A fixed random subset of ``items`` item indices per task, the same for every candidate."""
    if items is None:
        return None
    rng = np.random.default_rng(seed)
    out = {}
    for task, n in n_items.items():
        if items > n:
            raise EvomergeError(f"fitness.items={items} exceeds the {n} items of task {task!r}")
        out[task] = sorted(rng.choice(n, size=items, replace=False).tolist())
    return out


class Search:
    """One run of a config into a run folder. ``run()`` returns the run folder."""

    def __init__(self, config: RunConfig, out: str | Path | None = None, console: Any = None):
        self.config = config
        self.run_dir = Path(out or config.out or "runs/run")
        self.console = console
        zoo_dir = None
        refs = [config.models.base, *config.models.experts.values()]
        if any(r.startswith("zoo:") for r in refs):
            from evomerge import zoo

            zoo_dir = zoo.build_zoo(config.zoo.cache_dir, progress=console is not None)
        self.models = ModelSet(
            config.models.base,
            dict(config.models.experts),
            config.models.tokenizer,
            config.models.dtype,
            zoo_dir,
        )
        self.models.check()
        check_tasks(config.fitness.tasks, [str(p) for p in config.fitness.include])
        self.experts = list(config.models.experts)
        self.space = SearchSpace(config.search_space, self.experts, self.models.num_layers())
        self.objectives = config.objectives

    # --- plumbing -------------------------------------------------------------------------------------
    def _models_spec(self) -> dict[str, Any]:
        m = self.models
        return {
            "base": m.resolve(m.base),
            "experts": {k: m.resolve(v) for k, v in m.experts.items()},
            "tokenizer": m.resolve(m.tokenizer) if m.tokenizer else None,
            "dtype": m.dtype,
        }

    def _open_store(self) -> Store:
        path = self.run_dir / "store.sqlite"
        if path.exists():
            raise EvomergeError(f"run folder {str(self.run_dir)!r} already holds a run; choose another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        store = Store(path)
        store.set_meta("config", self.config.model_dump(mode="json"))
        store.set_meta("genes", self.space.describe())
        store.set_meta("models", self._models_spec())
        (self.run_dir / "config.yaml").write_text(self.config.to_yaml())
        return store

    def objective_values(self, values: dict[str, float]) -> dict[str, float]:
        return {o.name: values[o.of] for o in self.objectives}

    def to_F(self, c: Candidate) -> np.ndarray:
        if c.status != "ok":
            return np.full(len(self.objectives), FAILED_F)
        return np.array(
            [-c.objectives[o.name] if o.direction == "max" else c.objectives[o.name] for o in self.objectives]
        )

    def _record(self, job: Job, result: dict[str, Any]) -> Candidate:
        ok = result["status"] == "ok"
        c = Candidate(
            recipe=job.recipe,
            recipe_key=Recipe.from_dict(job.recipe).key(),
            split=job.split,
            status=result["status"],
            objectives=self.objective_values(result["values"]) if ok else None,
            metrics=result.get("values"),
            responses=result.get("responses"),
            n_items=result.get("n_items", 0),
            n_tokens=result.get("n_tokens", 0),
            wall_s=result["wall_s"],
            worker=result.get("worker"),
            error=result.get("error"),
            **job.record,
        )
        self.store.add(c)
        return c

    def evaluate(self, jobs: list[Job], describe: str) -> dict[Any, Candidate]:
        """Evaluate jobs in parallel, each distinct recipe once per split (also across generations),
        storing each result as it finishes. Returns job key -> candidate."""
        out: dict[Any, Candidate] = {}
        todo: dict[str, list[Job]] = {}
        for job in jobs:
            key = Recipe.from_dict(job.recipe).key()
            hit = self.store.find(key, job.split)
            if hit is not None:
                out[job.key] = hit
            else:
                todo.setdefault(key, []).append(job)
        with report.progress(self.console, describe, len(todo)) as advance:
            for job, result in self.pool.run([same[0] for same in todo.values()]):
                c = self._record(job, result)
                for twin in todo[c.recipe_key]:
                    out[twin.key] = c
                advance()
        return out

    # --- the run --------------------------------------------------------------------------------------
    def run(self) -> Path:
        from pymoo.core.evaluator import Evaluator as PymooEvaluator
        from pymoo.core.problem import Problem
        from pymoo.problems.static import StaticProblem

        cfg = self.config
        self.store = self._open_store()
        start = time.time()
        self.pool = WorkerPool(
            self._models_spec(),
            list(cfg.fitness.tasks),
            [str(p) for p in cfg.fitness.include],
            cfg.workers,
            cfg.fitness.batch_size,
            cfg.threads_per_worker,
            cfg.ray.address,
        )
        try:
            n_items = self.pool.call("n_items", cfg.fitness.search_split)
            items = choose_items(n_items, cfg.fitness.items, cfg.seed)
            problem = Problem(n_var=self.space.n_var, n_obj=len(self.objectives), xl=0.0, xu=1.0)
            algorithm = make_algorithm(cfg)
            algorithm.setup(
                problem, termination=("n_gen", cfg.algorithm.generations), seed=cfg.seed, verbose=False
            )
            generation = 0
            while algorithm.has_next():
                generation += 1
                pop = algorithm.ask()
                X = pop.get("X")
                jobs = [
                    Job(
                        i,
                        self.space.decode(x).to_dict(),
                        cfg.fitness.search_split,
                        items,
                        {"kind": "search", "generation": generation, "genome": [float(v) for v in x]},
                    )
                    for i, x in enumerate(X)
                ]
                results = self.evaluate(jobs, f"generation {generation}/{cfg.algorithm.generations}")
                F = np.stack([self.to_F(results[i]) for i in range(len(X))])
                PymooEvaluator().eval(StaticProblem(problem, F=F), pop)
                algorithm.tell(infills=pop)
                self.store.save_checkpoint(generation, algorithm)
            self._finish(time.time() - start)
        finally:
            self.pool.shutdown()
            self.store.close()
        return self.run_dir

    def _finish(self, search_seconds: float) -> None:
        cfg = self.config
        searched = [c for c in self.store.candidates(kind="search") if c.status == "ok"]
        if not searched:
            raise EvomergeError("every candidate failed; see the error column in the store")
        front = report.pareto_front(searched, self.objectives)
        best = report.pick_best(front, self.objectives)
        refs = reference_recipes(self.experts)
        split = cfg.fitness.test_split
        jobs = [
            Job(("front", c.id), c.recipe, split, None, {"kind": "test", "label": f"front:{c.id}"})
            for c in front
        ]
        jobs += [
            Job(("ref", name), r.to_dict(), split, None, {"kind": "reference", "label": name})
            for name, r in refs.items()
        ]
        test = self.evaluate(jobs, "test split")
        failed = [k for k, c in test.items() if c.status != "ok"]
        if failed:
            raise EvomergeError(f"test-split evaluation failed for {failed}: {test[failed[0]].error}")
        self.pool.call("save", best.recipe, str(self.run_dir / "best_model"))
        summary = {
            "objectives": [o.name for o in self.objectives],
            "best": test[("front", best.id)].objectives,
            "best_candidate": best.id,
            "base": test[("ref", "base")].objectives,
            "experts": {e: test[("ref", e)].objectives for e in self.experts},
            "front": [
                {"candidate": c.id, "search": c.objectives, "test": test[("front", c.id)].objectives}
                for c in front
            ],
            "candidates_evaluated": len(self.store.candidates(kind="search")),
            "search_seconds": round(search_seconds, 1),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        report.write_front_csv(
            self.run_dir / "front.csv", front, {c.id: test[("front", c.id)] for c in front}
        )
        if self.console is not None:
            report.print_summary(self.console, summary)
