"""The search: pymoo's ask/tell loop over genomes, candidates scored in parallel by workers, every
result written to the store as it arrives, the algorithm checkpointed after each generation."""

from __future__ import annotations

import contextlib
import json
import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evomerge import calibration, irt, preflight, report
from evomerge.algorithms import make_algorithm
from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.merge.merger import check_masks_reproducible
from evomerge.merge.streams import KEYED_VERSION
from evomerge.models import ModelSet, looks_local
from evomerge.recipe import Recipe
from evomerge.runfolder import RunFolder
from evomerge.searchspace import SearchSpace
from evomerge.store import PENDING, Candidate, Store, StoreFullError
from evomerge.workers import Job, WorkerPool

FAILED_F = 1e6  # what the algorithm sees for a failed candidate: worse than any real objective
# A run stops when its first evaluations (this many, or the whole first batch if smaller) all failed
# with the same error and none succeeded: the cause is the setup, not the candidates.
STOP_AFTER = 8


class SystematicFailure(EvomergeError):
    """Every evaluation so far failed with the same error; the run stopped and can be resumed."""


def stored_config(config: RunConfig) -> dict[str, Any]:
    """The config as the store keeps it (a Python fitness callable by its qualified name)."""
    data = config.model_dump(mode="json", exclude={"fitness": {"function"}})
    fn = config.fitness.function
    data["fitness"]["function"] = (
        fn if fn is None or isinstance(fn, str) else f"{fn.__module__}:{fn.__qualname__}"
    )
    return data


# What may differ between the config a run was started with and the one it is resumed with.
RESUMABLE = ("workers", "threads_per_worker", "ray", "retries", "out")
RESUMABLE_FITNESS = ("timeout",)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config with the defaults of this evomerge filled in and where-it-runs keys left out."""
    from evomerge.config import parse_config

    with contextlib.suppress(EvomergeError):
        config = stored_config(parse_config(config))
    fitness = {k: v for k, v in config.get("fitness", {}).items() if k not in RESUMABLE_FITNESS}
    return {**{k: v for k, v in config.items() if k not in RESUMABLE}, "fitness": fitness}


def resume_search(
    run_dir: str | Path, config: RunConfig | None = None, console: Any = None, **kw: Any
) -> Search:
    """A Search that continues the run in ``run_dir``. ``config``, when given, must be the run's own
    (only where it runs may differ: workers, threads, Ray, retries)."""
    from evomerge.config import parse_config

    run_dir = Path(run_dir)
    store = RunFolder(run_dir).open_store(readonly=True)
    try:
        stored, models = store.get_meta("config"), store.get_meta("models")
    finally:
        store.close()
    if stored is None:
        raise EvomergeError(f"run folder {str(run_dir)!r} has not recorded its config; start a new run")
    if config is not None:
        given, had = _comparable(stored_config(config)), _comparable(stored)
        changed = sorted(k for k in set(had) | set(given) if had.get(k) != given.get(k))
        if changed:
            raise EvomergeError(
                f"run folder {str(run_dir)!r} belongs to another config (differs in: {', '.join(changed)}); "
                "resume it with its own config, or start a new run with --out"
            )
    else:
        config = parse_config({**stored, "out": str(run_dir)})
    # The run goes on with the model folders it started with, even where its references now resolve to
    # others (a zoo rebuilt under a new recipe, a GGUF converted anew).
    for ref in [models["base"], *models["experts"].values(), models["tokenizer"]] if models else []:
        if ref and looks_local(ref) and not Path(ref).is_dir():
            raise EvomergeError(
                f"run folder {str(run_dir)!r} was started with model folder {ref!r}, which no longer exists"
            )
    return Search(config, out=run_dir, console=console, models=models, **kw)


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
    """One run of a config into a run folder. ``run()`` starts it, ``resume()`` continues a stopped one;
    both return the run folder. ``fitness`` (a callable ``(model, tokenizer) -> dict``) replaces the
    config's fitness, for searches driven from Python. ``models`` (the resolved folders a run recorded,
    see :func:`resume_search`) replaces the config's model references."""

    def __init__(
        self,
        config: RunConfig,
        out: str | Path | None = None,
        console: Any = None,
        fitness: Callable[[Any, Any], Any] | None = None,
        models: dict[str, Any] | None = None,
    ):
        if fitness is not None:
            config = config.model_copy(
                update={"fitness": config.fitness.model_copy(update={"function": fitness, "tasks": ()})}
            )
        self.config = config
        self.fitness_fn = fitness
        self.run_dir = Path(out or config.out or "runs/run")
        self.folder = RunFolder(self.run_dir)
        self.console = console
        # Everything that needs no weights is checked before anything slow (zoo build, Ray, loading).
        preflight.check_run(config, self.run_dir, new=False)
        if models is not None:
            self.models = ModelSet(**models)
        else:
            zoo_dir = None
            refs = [config.models.base, *config.models.experts.values()]
            if any(r.startswith("zoo:") for r in refs):
                from evomerge import zoo

                if console is not None and not zoo.is_built(config.zoo.cache_dir):
                    console.print("building the tiny model zoo (first use only; about 2 minutes on 2 cores)")
                zoo_dir = zoo.build_zoo(config.zoo.cache_dir, progress=report.progress_mode(console))
            self.models = ModelSet(
                config.models.base,
                dict(config.models.experts),
                config.models.tokenizer,
                config.models.dtype,
                zoo_dir,
            )
        self.models.check()
        self.experts = list(config.models.experts)
        self.space = SearchSpace(config.search_space, self.experts, self.models.num_layers())
        if config.algorithm.initial == "experts":
            for e in self.experts:  # refuse a space that cannot express them before anything is stored
                self.space.expert_genome(e)
        self.objectives = config.objectives
        self.subsets: dict[str, calibration.Subset] = {}  # objective name -> its IRT item subset

    # --- plumbing -------------------------------------------------------------------------------------
    def _models_spec(self) -> dict[str, Any]:
        m = self.models
        return {
            "base": m.resolve(m.base),
            "experts": {k: m.resolve(v) for k, v in m.experts.items()},
            "tokenizer": m.resolve(m.tokenizer) if m.tokenizer else None,
            "dtype": m.dtype,
        }

    def _fitness_spec(self) -> dict[str, Any]:
        f = self.config.fitness
        if f.function is not None:
            return {"function": f.function}
        return {"tasks": list(f.tasks), "include": [str(p) for p in f.include], "batch_size": f.batch_size}

    def _open_store(self, changed_layers: list[int | None]) -> Store:
        store = self.folder.create_store()
        store.set_meta("config", stored_config(self.config))
        store.set_meta("models", self._models_spec())
        store.set_meta("keyed_stream", KEYED_VERSION)
        store.set_meta("changed_layers", changed_layers)
        store.set_meta("genes", self.space.describe())
        self.folder.write_text("config.yaml", yaml.safe_dump(stored_config(self.config), sort_keys=False))
        return store

    def objective_values(
        self,
        values: dict[str, float],
        responses: dict[str, dict[str, float]] | None = None,
        genome: list[float] | None = None,
    ) -> dict[str, float]:
        """Objective values from a fitness result; with ``responses`` (a search candidate scored on
        its subsets), objectives with an estimator get the IRT estimate of their full-split value."""
        if responses is not None and self.subsets:
            out = {}
            for o in self.objectives:
                sub = self.subsets.get(o.name)
                out[o.name] = sub.estimate(responses, genome)[0] if sub else self._value(o, values)
            return out
        return {o.name: self._value(o, values) for o in self.objectives}

    def _value(self, o: Any, values: dict[str, float]) -> float:
        if o.of not in values:
            raise EvomergeError(
                f"fitness returned no value {o.of!r} for objective {o.name!r}; it returned: {', '.join(values)}"
            )
        return values[o.of]

    def to_F(self, c: Candidate) -> np.ndarray:
        if c.status != "ok":
            return np.full(len(self.objectives), FAILED_F)
        return np.array(
            [-c.objectives[o.name] if o.direction == "max" else c.objectives[o.name] for o in self.objectives]
        )

    def _reserve(self, job: Job, key: str, failed: Candidate | None) -> int:
        """The candidate id of an evaluation about to be dispatched: its reservation from before a stop,
        the failed row being retried, or a new reservation (in the order the run asks, not the order
        workers finish, so a resumed run gives every evaluation the id it had)."""
        if failed is not None:
            return failed.id
        found = self.store.reserved(key, job.split, job.subset)
        if found is not None:
            return found
        c = Candidate(
            recipe=job.recipe,
            recipe_key=key,
            split=job.split,
            subset=job.subset,
            status=PENDING,
            **job.record,
        )
        return self._write(self.store.add, c)

    def _write(self, write: Callable[[Candidate], Any], c: Candidate) -> Any:
        """A store write; a full disk or a vanished run folder stops the run in one line."""
        try:
            out = write(c)
        except StoreFullError:
            raise EvomergeError(self._disk_full_message()) from None
        if not self.folder.store_path.exists():
            raise EvomergeError(
                f"run folder {str(self.run_dir)!r} vanished during the run (its store.sqlite is gone); "
                "what the run stored there is lost: start the run again"
            )
        return out

    def _disk_full_message(self) -> str:
        import shutil

        free = shutil.disk_usage(self.run_dir).free
        return (
            f"the disk holding run folder {str(self.run_dir)!r} is full ({free / 2**20:.0f} MiB free); "
            f"nothing was half-stored: free some space and continue with `evomerge resume {self.run_dir}`"
        )

    def _record(self, job: Job, result: dict[str, Any], cid: int) -> Candidate:
        ok = result["status"] == "ok"
        objectives = None
        if ok:  # a missing objective stops the run before anything is stored
            estimate = job.record.get("kind") == "search"
            objectives = self.objective_values(
                result["values"], result.get("responses") if estimate else None, job.record.get("genome")
            )
        c = Candidate(
            recipe=job.recipe,
            recipe_key=Recipe.from_dict(job.recipe).key(),
            split=job.split,
            subset=job.subset,
            status=result["status"],
            objectives=objectives,
            metrics=result.get("values"),
            responses=result.get("responses"),
            n_items=result.get("n_items", 0),
            n_tokens=result.get("n_tokens", 0),
            wall_s=result["wall_s"],
            worker=result.get("worker"),
            error=result.get("error"),
            trace=result.get("trace"),
            id=cid,
            **job.record,
        )
        self._write(self.store.finish, c)
        self._watch_failures(c)
        return c

    def _watch_failures(self, c: Candidate) -> None:
        """Stop the run when its first evaluations all failed with the same error."""
        if c.status == "ok":
            self._succeeded = True
            return
        if self._succeeded:
            return
        self._failures.append(c)
        firsts = {_first_line(f.error) for f in self._failures}
        if len(self._failures) >= self._stop_after and len(firsts) == 1:
            first = min(self._failures, key=lambda f: f.id)
            self.store.set_meta("stopped_on", {"error": _first_line(first.error), "candidate": first.id})
            raise SystematicFailure(
                f"every evaluation so far failed with the same error ({len(self._failures)} of "
                f"{len(self._failures)}): {_first_line(first.error)} (candidate {first.id}; whole trace: "
                f"`evomerge show {self.run_dir} --candidate {first.id}`); fix the cause and continue with "
                f"`evomerge resume {self.run_dir}`"
            )

    def evaluate(self, jobs: list[Job], describe: str) -> dict[Any, Candidate]:
        """Evaluate jobs in parallel, each distinct recipe once per split (also across generations),
        storing each result as it finishes. Returns job key -> candidate."""
        out: dict[Any, Candidate] = {}
        todo: dict[str, list[Job]] = {}
        retried: dict[str, Candidate] = {}
        for job in jobs:
            key = Recipe.from_dict(job.recipe).key()
            hit = self.store.find(key, job.split, job.subset)
            if hit is not None and hit.status == "failed" and self._retry_failed:
                retried[key] = hit
                hit = None
            if hit is not None:
                out[job.key] = hit
            else:
                todo.setdefault(key, []).append(job)
        ids = {key: self._reserve(same[0], key, retried.get(key)) for key, same in todo.items()}
        if not self._succeeded:
            self._stop_after = min(STOP_AFTER, max(len(todo), 1))
        with report.progress(self.console, describe, len(todo)) as advance:
            for job, result in self.pool.run([same[0] for same in todo.values()]):
                key = Recipe.from_dict(job.recipe).key()
                c = self._record(job, result, ids[key])
                if result.get("fatal"):
                    raise EvomergeError(result["error"])
                for twin in todo[key]:
                    out[twin.key] = c
                advance()
        return out

    # --- the run --------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Start the run in a new run folder."""
        with self.session():
            return self._loop(resume=False)

    def resume(self) -> Path:
        """Continue the run in ``run_dir`` from its last checkpoint; nothing stored is evaluated again."""
        with self.session(resume=True):
            return self._loop(resume=True)

    @contextlib.contextmanager
    def session(self, resume: bool = False) -> Iterator[Search]:
        """The run's store (new, or the existing one when ``resume``) and its workers, for the duration.

        Layer groups in which no expert differs from the base get no genes (see SearchSpace): a worker,
        which holds the models, says where they differ, and the run folder records it, so a resumed run
        keeps its genome (runs recorded before this search every group). A new run's store is created
        only once that is known, so a run that cannot start leaves nothing behind."""
        cfg = self.config
        self._failures: list[Candidate] = []
        self._succeeded = False
        self._retry_failed = False
        self._stop_after = STOP_AFTER
        with contextlib.ExitStack() as stack:
            if resume:
                self.store = self.folder.open_store()
                stack.callback(self.store.close)
                self._succeeded = any(c.status == "ok" for c in self.store.candidates())
                self._retry_failed = self.store.get_meta("stopped_on") is not None
                check_masks_reproducible(
                    self.store.get_meta("keyed_stream"), cfg.search_space.methods, self.run_dir
                )
                started = self.store.get_meta("models")
                if started is not None and started != self._models_spec():
                    raise EvomergeError(
                        f"run folder {str(self.run_dir)!r} was started with other model folders than this "
                        f"config's references resolve to now; continue it with `evomerge resume {self.run_dir}`"
                    )
            else:
                self.folder.check_new()  # before the workers start
            self.pool = WorkerPool(
                self._models_spec(),
                self._fitness_spec(),
                cfg.workers,
                cfg.threads_per_worker,
                cfg.ray.address,
                cfg.retries,
                cfg.fitness.timeout,
            )
            stack.callback(self.pool.shutdown)
            changed = self.store.get_meta("changed_layers") if resume else self.pool.call("changed_layers")
            self.space = SearchSpace(cfg.search_space, self.experts, self.models.num_layers(), changed)
            if not resume:
                self.store = self._open_store(changed)
                stack.callback(self.store.close)
            yield self

    def _restore(self, problem: Any) -> tuple[Any, int]:
        """The algorithm and the generation it finished: from the last checkpoint, or set up afresh
        (generation 0; algorithms that cannot be pickled replay their generations from the store)."""
        cfg = self.config
        last = self.store.last_checkpoint()
        if last is not None:
            generation, algorithm = last
            return algorithm, generation
        algorithm = make_algorithm(
            cfg.algorithm.name,
            cfg.algorithm.pop_size,
            dict(cfg.algorithm.options),
            len(self.objectives),
            self.initial_population(),
        )
        algorithm.setup(
            problem, termination=("n_gen", cfg.algorithm.generations), seed=cfg.seed, verbose=False
        )
        return algorithm, 0

    def initial_population(self) -> np.ndarray | None:
        """``algorithm.initial: experts``: one genome per expert that reproduces it, then random genomes
        (seeded by the run's seed) up to pop_size; None for the algorithm's own random start."""
        cfg = self.config
        if cfg.algorithm.initial == "random":
            return None
        experts = np.stack([self.space.expert_genome(e) for e in self.experts])
        rng = np.random.default_rng(cfg.seed)
        rest = rng.random((cfg.algorithm.pop_size - len(experts), self.space.n_var))
        return np.concatenate([experts, rest])

    def _checkpoint(self, generation: int, algorithm: Any) -> None:
        try:
            self.store.save_checkpoint(generation, algorithm)
        except (TypeError, AttributeError, pickle.PicklingError):
            # e.g. CMA-ES holds a generator: a resume replays its generations, answered from the store
            self.store.set_meta("checkpoint", "replay")
        except StoreFullError:
            raise EvomergeError(self._disk_full_message()) from None

    def _loop(self, resume: bool) -> Path:
        from pymoo.core.evaluator import Evaluator as PymooEvaluator
        from pymoo.core.problem import Problem
        from pymoo.problems.static import StaticProblem

        cfg = self.config
        start = time.time() - (self.store.get_meta("search_seconds", 0.0) if resume else 0.0)
        items = None
        if cfg.fitness.tasks:
            n_items = self.pool.call("n_items", cfg.fitness.search_split)
            items = choose_items(n_items, cfg.fitness.items, cfg.seed)
            if any(o.estimator for o in self.objectives):
                self.subsets = self._prepare_estimators(n_items)
                items = calibration.union_items(list(self.subsets.values()))
        problem = Problem(n_var=self.space.n_var, n_obj=len(self.objectives), xl=0.0, xu=1.0)
        algorithm, generation = self._restore(problem)
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
            self._checkpoint(generation, algorithm)
            self.store.set_meta("search_seconds", time.time() - start)
        self._finish(time.time() - start)
        return self.run_dir

    # --- IRT fitness ------------------------------------------------------------------------------------
    def calibrate(self) -> list[Candidate]:
        """Evaluate the base, the experts and random merges on the whole search split (stored as
        ``kind="calibration"``); the endpoints come first."""
        cfg = self.config
        recipes = [
            (label, r, self._input_genome(label)) for label, r in reference_recipes(self.experts).items()
        ]
        recipes += [
            (f"random-{i}", self.space.decode(g), [float(v) for v in g])
            for i, g in enumerate(self.calibration_genomes())
        ]
        jobs = [
            Job(
                i,
                r.to_dict(),
                cfg.fitness.search_split,
                None,
                {"kind": "calibration", "label": label, **({"genome": g} if g is not None else {})},
            )
            for i, (label, r, g) in enumerate(recipes)
        ]
        done = self.evaluate(jobs, "calibration")
        failed = [c for c in done.values() if c.status != "ok"]
        if failed:
            raise EvomergeError(f"calibration evaluation failed: {failed[0].error}")
        return [done[i] for i in range(len(jobs))]

    def _input_genome(self, label: str) -> list[float] | None:
        """The genome that reproduces the base or an expert, where the search space can express it
        (the surrogate then learns the corners the search starts from); None elsewhere."""
        try:
            x = self.space.base_genome() if label == "base" else self.space.expert_genome(label)
        except EvomergeError:
            return None
        return [float(v) for v in x]

    def calibration_genomes(self) -> list[np.ndarray]:
        """The calibration's random merges, uniform in the genome space (seeded by the run's seed)."""
        rng = np.random.default_rng(self.config.seed + 1)
        return [rng.random(self.space.n_var) for _ in range(self.config.fitness.calibration.random_merges)]

    def _prepare_estimators(self, n_items: dict[str, int]) -> dict[str, calibration.Subset]:
        """Each estimated objective's item subset, from saved IRT parameters or a calibration."""
        cfg = self.config
        cal = cfg.fitness.calibration
        folder = self.folder.irt
        scopes: dict[str, calibration.Scope | None] = {}
        for o in self.objectives:
            if o.estimator and o.of not in scopes:
                cols = calibration.columns(n_items, o.of)
                scopes[o.of] = calibration.Scope.load(Path(cal.params or folder), o.of, cols)
        subjects = None
        if any(sc is None for sc in scopes.values()):
            if cal.params is not None:
                missing = [name for name, sc in scopes.items() if sc is None]
                raise EvomergeError(f"calibration.params {str(cal.params)!r} has no parameters for {missing}")
            subjects = self.calibrate()
            responses = [c.responses for c in subjects]
            for name, sc in scopes.items():
                if sc is None:
                    cols = calibration.columns(n_items, name)
                    sc = calibration.fit_scope(
                        name, cols, responses, 1 + len(self.experts), cal.model, cfg.seed
                    )
                    sc.save(folder)
                    scopes[name] = sc
        surrogate = {o.of for o in self.objectives if o.estimator in irt.PRIOR_ESTIMATORS}
        if surrogate:  # refitted from the stored calibration (re-evaluates nothing) on every start
            subjects = subjects or self.calibrate()
            known = [c for c in subjects if c.genome is not None]  # the random merges, base and experts
            genomes = [c.genome for c in known]
            for name in surrogate:
                calibration.fit_surrogate(scopes[name], genomes, [c.responses for c in known], cfg.seed)
        return {
            o.name: calibration.select(o.name, scopes[o.of], o.items, o.selection, o.estimator, cfg.seed)
            for o in self.objectives
            if o.estimator
        }

    def _estimation_report(self, front: list[Candidate]) -> tuple[dict[str, Any], dict[int, Candidate]]:
        """The estimator's error on the front (estimate vs the whole search split) and the cost saved;
        and the front's evaluations on the whole search split, by candidate id."""
        cfg = self.config
        jobs = [
            Job(
                ("full", c.id),
                c.recipe,
                cfg.fitness.search_split,
                None,
                {"kind": "full", "label": f"full:{c.id}"},
            )
            for c in front
        ]
        full = self.evaluate(jobs, "front, full search split")
        errors = {}
        for name in self.subsets:
            pairs = [(c.objectives[name], full[("full", c.id)].objectives[name]) for c in front]
            errors[name] = {
                "mae_on_front": float(np.mean([abs(a - b) for a, b in pairs])),
                "front": [
                    {"candidate": c.id, "estimate": a, "full": b}
                    for c, (a, b) in zip(front, pairs, strict=True)
                ],
            }
        n_full = sum(len(s.scope.cols) for s in self.subsets.values() if s.scope.name == "mean") or max(
            len(s.scope.cols) for s in self.subsets.values()
        )
        searched = [c for c in self.store.candidates(kind="search") if c.status == "ok"]
        cost = calibration.describe_cost(self.store.candidates(kind="calibration"), searched, n_full)
        return {"errors": errors, "cost": cost}, {c.id: full[("full", c.id)] for c in front}

    def _finish(self, search_seconds: float) -> None:
        cfg = self.config
        everything = self.store.candidates(kind="search")
        searched = [c for c in everything if c.status == "ok"]
        if not searched:
            raise EvomergeError(self._all_failed_message(everything))
        front = report.pareto_front(searched, self.objectives)
        # With estimated objectives the front is re-scored on the whole search split (the estimator's
        # error report needs it anyway), and the best model is picked on measured values only: among
        # the re-scored front and the calibration models (base, experts, random merges), which were
        # measured on the whole search split too.
        estimation, measured = self._estimation_report(front) if self.subsets else (None, None)
        if measured is None:
            best = report.pick_best(front, self.objectives)
        else:
            calibrated = [c for c in self.store.candidates(kind="calibration") if c.status == "ok"]
            best = report.pick_best_measured(front, calibrated, measured, self.objectives)
        refs = reference_recipes(self.experts)
        split = cfg.fitness.test_split
        jobs = [
            Job(("front", c.id), c.recipe, split, None, {"kind": "test", "label": f"front:{c.id}"})
            for c in front
        ]
        jobs.append(Job("best", best.recipe, split, None, {"kind": "test", "label": f"best:{best.id}"}))
        jobs += [
            Job(("ref", name), r.to_dict(), split, None, {"kind": "reference", "label": name})
            for name, r in refs.items()
        ]
        test = self.evaluate(jobs, "test split")
        failed = [k for k, c in test.items() if c.status != "ok"]
        if failed:
            raise EvomergeError(f"test-split evaluation failed for {failed}: {test[failed[0]].error}")
        self._save_best(best.recipe)
        names = [o.name for o in self.objectives]
        summary = {
            "objectives": names,
            "best": test["best"].objectives,
            "best_candidate": best.id,
            **({"best_label": best.label} if best.kind == "calibration" else {}),
            "best_recipe": report.recipe_summary(best.recipe),
            "base": test[("ref", "base")].objectives,
            "experts": {e: test[("ref", e)].objectives for e in self.experts},
            "front": [
                {
                    "candidate": c.id,
                    "search": {n: c.objectives[n] for n in names},
                    "test": {n: test[("front", c.id)].objectives[n] for n in names},
                    "recipe": report.recipe_summary(c.recipe),
                }
                for c in front
            ],
            "candidates_evaluated": len(everything),
            "best_picked_on": (
                "the whole search split: the re-scored front and the calibration models"
                if measured
                else "search values"
            ),
            "best_picked_how": report.PICK_RULE,
            **({"estimation": estimation} if estimation else {}),
            "search_seconds": round(search_seconds, 1),
        }
        try:  # summary.json last: a run folder with it is a finished run
            report.write_front_csv(
                self.folder, front, {c.id: test[("front", c.id)] for c in front}, self.objectives
            )
            self.folder.write_text("summary.json", json.dumps(summary, indent=2))
        except OSError as e:
            if preflight.disk_full(e):
                raise EvomergeError(self._disk_full_message()) from None
            raise
        self.store.set_meta("stopped_on", None)
        if self.console is not None:
            report.print_summary(self.console, summary)

    def _save_best(self, recipe: dict[str, Any]) -> None:
        """best_model/ written whole or not at all (a temporary folder renamed into place)."""
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix=".best_model-", dir=self.run_dir))
        try:
            self.pool.call("save", recipe, str(tmp))
            if self.folder.best_model.exists():
                shutil.rmtree(self.folder.best_model)
            tmp.rename(self.folder.best_model)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if preflight.disk_full(e):
                raise EvomergeError(self._disk_full_message()) from None
            raise

    def _all_failed_message(self, candidates: list[Candidate]) -> str:
        from collections import Counter

        errors = Counter(_first_line(c.error) for c in candidates)
        error, n = errors.most_common(1)[0] if errors else ("no candidate was evaluated", 0)
        first = next((c for c in candidates if _first_line(c.error) == error), None)
        where = (
            f" (candidate {first.id}; whole trace: `evomerge show {self.run_dir} --candidate {first.id}`)"
            if first
            else ""
        )
        return (
            f"every search candidate failed ({len(candidates)}); the most common error ({n} of "
            f"{len(candidates)}): {error}{where}"
        )


def _first_line(error: str | None) -> str:
    lines = (error or "").strip().splitlines()
    return lines[0] if lines else "(no error message)"
