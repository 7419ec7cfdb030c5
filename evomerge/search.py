"""The user's handle on a run: ``Search(config).run()`` starts one in a new run folder,
``resume_search(run_dir).resume()`` continues a stopped one. A Search checks the config and the models
before anything slow, then holds the run's session: its store (through the run folder), its workers
and the evaluations between them; the loop (:mod:`evomerge.loop`), the IRT stage
(:mod:`evomerge.calibration`) and the end of the run (:mod:`evomerge.summary`) do the rest."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from evomerge import loop, objectives, preflight, report, summary
from evomerge.algorithms import spec_for
from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.evaluations import Evaluations, SystematicFailure, no_progress
from evomerge.fitness import fitness_spec
from evomerge.merge.merger import check_masks_reproducible
from evomerge.merge.streams import KEYED_VERSION
from evomerge.models import ModelSet, looks_local
from evomerge.runfolder import RunFolder
from evomerge.searchspace import SearchSpace
from evomerge.session import Refresh, RunSession, RunState, Scorer
from evomerge.workers import Where, WorkerPool

__all__ = ["Search", "SystematicFailure", "resume_search", "stored_config"]


def stored_config(config: RunConfig) -> dict[str, Any]:
    """The config as the store keeps it (a Python fitness callable by its qualified name)."""
    data = config.model_dump(mode="json", exclude={"fitness": {"function"}})
    from evomerge.fitness.base import BACKENDS, select_backend

    chosen = select_backend(dict(config.fitness))
    for name in BACKENDS:  # another backend's options at their defaults: not the run's (a plugin's,
        backend = BACKENDS.get(name)  # uninstalled later, would make the stored config unreadable)
        if backend is not chosen:
            for field, info in backend.model.model_fields.items():
                if (
                    field in data["fitness"]
                    and field != "function"
                    and getattr(config.fitness, field) == info.default
                ):
                    del data["fitness"][field]
    fn = config.fitness.function
    data["fitness"]["function"] = (
        fn if fn is None or isinstance(fn, str) else f"{fn.__module__}:{fn.__qualname__}"
    )
    return data


# What may differ between the config a run was started with and the one it is resumed with.
RESUMABLE = (
    "workers",
    "threads_per_worker",
    "ray",
    "retries",
    "out",
    "device",
    "placement",
    "gpus_per_worker",
)
RESUMABLE_FITNESS = ("timeout", "batch_size")  # batch_size: unset, the memory plan's for the machine


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config with the defaults of this evomerge filled in and where-it-runs keys left out."""
    from evomerge.config import parse_config

    with contextlib.suppress(EvomergeError):
        config = stored_config(parse_config(config))
    fitness = {k: v for k, v in config.get("fitness", {}).items() if k not in RESUMABLE_FITNESS}
    return {**{k: v for k, v in config.items() if k not in RESUMABLE}, "fitness": fitness}


def resume_search(
    run_dir: str | Path,
    config: RunConfig | None = None,
    console: Any = None,
    *,
    workers: int | str | None = None,
    ray_address: str | None = None,
    **kw: Any,
) -> Search:
    """A Search that continues the run in ``run_dir``. ``config``, when given, must be the run's own
    (only where it runs may differ: workers, threads, Ray, retries, device); ``workers`` and
    ``ray_address`` replace the config's."""
    from evomerge.config import parse_config

    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    store = folder.open_store(readonly=True)
    try:
        meta = folder.meta(store)
        stored, models = meta.config, meta.models
    finally:
        store.close()
    if stored is None:
        raise EvomergeError(f"run folder {str(run_dir)!r} has not recorded its config; start a new run")
    if config is not None:
        if config.models.dtype is None:  # the run's dtype was resolved when it started
            dtype = stored.get("models", {}).get("dtype")
            config = config.model_copy(update={"models": config.models.model_copy(update={"dtype": dtype})})
        if "pop_size" not in config.algorithm.model_fields_set:  # and so was a surrogate's batch
            batch = stored.get("algorithm", {}).get("pop_size", config.algorithm.pop_size)
            config = config.model_copy(
                update={"algorithm": config.algorithm.model_copy(update={"pop_size": batch})}
            )
        given, had = _comparable(stored_config(config)), _comparable(stored)
        changed = sorted(k for k in set(had) | set(given) if had.get(k) != given.get(k))
        if changed:
            raise EvomergeError(
                f"run folder {str(run_dir)!r} belongs to another config (differs in: {', '.join(changed)}); "
                "resume it with its own config, or start a new run with --out"
            )
    else:
        config = parse_config({**stored, "out": str(run_dir)})
    if workers is not None:
        config = config.model_copy(update={"workers": workers})
    if ray_address:
        config = config.model_copy(update={"ray": config.ray.model_copy(update={"address": ray_address})})
    # The run goes on with the model folders it started with, even where its references now resolve to
    # others (a zoo rebuilt under a new recipe, a GGUF converted anew).
    for ref in [models["base"], *models["experts"].values(), models["tokenizer"]] if models else []:
        if ref and looks_local(ref) and not Path(ref).is_dir():
            raise EvomergeError(
                f"run folder {str(run_dir)!r} was started with model folder {ref!r}, which no longer exists"
            )
    return Search(config, out=run_dir, console=console, models=models, **kw)


class Search:
    """One run of a config into a run folder. ``run()`` starts it, ``resume()`` continues a stopped one;
    both return the run folder. ``fitness`` (a callable ``(model, tokenizer) -> dict``) replaces the
    config's fitness, for searches driven from Python. ``models`` (the resolved folders a run recorded,
    see :func:`resume_search`) replaces the config's model references. ``refresh``, called with the run's
    :class:`~evomerge.session.RunState` before the first generation, after each and at the end, rewrites
    the run's report (the CLI passes :func:`evomerge.report.page.refresher`); None: no report."""

    def __init__(
        self,
        config: RunConfig,
        out: str | Path | None = None,
        console: Any = None,
        fitness: Callable[[Any, Any], Any] | None = None,
        models: dict[str, Any] | None = None,
        refresh: Refresh | None = None,
    ):
        if fitness is not None:
            config = config.model_copy(
                update={"fitness": config.fitness.model_copy(update={"function": fitness, "tasks": ()})}
            )
        self.fitness_fn = fitness
        self._refresh = refresh
        self.run_dir = Path(out or config.out or "runs/run")
        self.folder = RunFolder(self.run_dir)
        self.console = console
        # Everything that needs no weights is checked before anything slow (zoo build, Ray, loading),
        # ending with the memory plan: where workers hold their models and how many fit.
        self.plan = preflight.check_run(config, self.run_dir, new=False)
        self.device = preflight.resolve_device(config)
        if config.models.dtype is None:  # the device's default, recorded with the run
            dtype = preflight.compute_dtype(config, self.device)
            config = config.model_copy(update={"models": config.models.model_copy(update={"dtype": dtype})})
        if (
            spec_for(config.algorithm.name).batch_of_workers
            and "pop_size" not in config.algorithm.model_fields_set
        ):
            # a surrogate proposes one candidate per worker at a time, recorded with the run
            workers = self.plan.workers if self.plan else preflight.workers_wanted(config, self.device)
            batch = workers if isinstance(workers, int) else 2  # auto on a cluster: known only later
            config = config.model_copy(
                update={"algorithm": config.algorithm.model_copy(update={"pop_size": batch})}
            )
        self.config = config
        if console is not None and self.plan is not None:
            report.print_lines(console, self.plan.lines())
        if models is not None:
            self.models = ModelSet(**models)
        else:
            # References that build their model (zoo:, realzoo:, GGUF files) build it in check(), into
            # zoo.cache_dir; a zoo's first build is announced on the console.
            self.models = ModelSet(
                config.models.base,
                dict(config.models.experts),
                config.models.tokenizer,
                config.models.dtype,
                config.models.vocab,
                cache_dir=config.zoo.cache_dir,
                progress=report.progress_mode(console),
                announce=None if console is None else console.print,
            )
        self.models.check()
        self.experts = list(config.models.experts)
        self.space = SearchSpace(config.search_space, self.experts, self.models.num_layers())
        if self.space.flow is not None and self.space.flow.scaled:  # refuse what no candidate could merge
            from evomerge.flow import scalable

            scalable(self.models.config(self.models.base).model_type)
        if config.algorithm.initial == "experts":
            for e in self.experts:  # refuse a space that cannot express them before anything is stored
                self.space.expert_genome(e)
        self.objectives = config.objectives
        self.scorer = Scorer(config.objectives)  # a finished evaluation's objective values

    # --- what the workers get -------------------------------------------------------------------------
    def _models_spec(self) -> dict[str, Any]:
        m = self.models
        return {
            "base": m.resolve(m.base),
            "experts": {k: m.resolve(v) for k, v in m.experts.items()},
            "tokenizer": m.resolve(m.tokenizer) if m.tokenizer else None,
            "dtype": m.dtype,
            "vocab": m.vocab,
        }

    def _where(self) -> tuple[int | str, Where]:
        """How many workers, and where each holds its models (the memory plan's choice)."""
        cfg, plan = self.config, self.plan
        if plan is None:  # sizes unknown offline, or a cluster's GPUs: each worker checks its own
            placement = (
                cfg.placement if cfg.placement != "auto" else ("host" if self.device == "cpu" else "device")
            )
            gpus = preflight.gpus_per_worker(cfg, self.device)
            return preflight.workers_wanted(cfg, self.device), Where(self.device, placement, gpus)
        need = plan.chosen.memory.device if plan.chosen.placement != "host" else None
        return plan.workers, Where(self.device, plan.chosen.placement, plan.gpus_per_worker, need)

    def _fitness_spec(self) -> dict[str, Any]:
        """The fitness config's fields for the workers, with lm-eval's batch the memory plan's."""
        cfg = self.config
        spec = fitness_spec(cfg.fitness, objectives.scored(cfg.objectives), cfg.seed)
        if "batch_size" in spec and self.plan is not None and self.plan.batch is not None:
            spec["batch_size"] = self.plan.batch
        return spec

    # --- the run --------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Start the run in a new run folder."""
        with self.session() as session:
            self._finish(session, loop.run_generations(session))
        return self.run_dir

    def resume(self) -> Path:
        """Continue the run in ``run_dir`` from its last checkpoint; nothing stored is evaluated again."""
        with self.session(resume=True) as session:
            before = self.folder.meta(session.evals.store).search_seconds or 0.0
            self._finish(session, loop.run_generations(session, before))
        return self.run_dir

    def calibrate(self, refit: bool = True) -> Any:
        """Only the IRT stage: calibrate the config's items (sized as a run would) into its item bank,
        fit each estimated scope (``mean`` where no objective has an estimator) and return the bank."""
        with self.session() as session:
            return loop.calibrate_bank(session, refit)

    def _finish(self, session: RunSession, search_seconds: float) -> None:
        done = summary.finish(session, search_seconds)
        self.refresh_report()
        if self.console is not None:
            report.print_summary(self.console, done)

    def refresh_report(self, generation: int | None = None, seconds_left: float | None = None) -> None:
        """Hand the store as it is now to the ``refresh`` callback (nothing without one): after a
        generation, ``generation`` and the estimated ``seconds_left``."""
        if self._refresh is None:
            return
        self._refresh(
            RunState(
                self.run_dir,
                self.evals.store.snapshot,
                generation,
                self.config.algorithm.generations,
                seconds_left,
            )
        )

    @contextlib.contextmanager
    def session(self, resume: bool = False) -> Iterator[RunSession]:
        """The run's store (new, or the existing one when ``resume``), its workers and the evaluations
        between them, for the duration.

        Layer groups in which no expert differs from the base get no genes (see SearchSpace): a worker,
        which holds the models, says where they differ, and the run folder records it, so a resumed run
        keeps its genome (runs recorded before this search every group). A new run's store is created
        only once that is known, so a run that cannot start leaves nothing behind."""
        cfg = self.config
        with contextlib.ExitStack() as stack:
            store = None
            if resume:
                store = self.folder.open_store()
                stack.callback(store.close)
                meta = self.folder.meta(store)
                check_masks_reproducible(meta.keyed_stream, cfg.search_space.methods, self.run_dir)
                # runs recorded before models.vocab merged the base's vocabulary
                if meta.models is not None and {"vocab": "base", **meta.models} != self._models_spec():
                    raise EvomergeError(
                        f"run folder {str(self.run_dir)!r} was started with other model folders than this "
                        f"config's references resolve to now; continue it with `evomerge resume {self.run_dir}`"
                    )
            else:
                self.folder.check_new()  # before the workers start
            workers, where = self._where()
            self.pool = WorkerPool(
                self._models_spec(),
                self._fitness_spec(),
                workers,
                cfg.threads_per_worker,
                cfg.ray.address,
                cfg.retries,
                cfg.fitness.timeout,
                where,
            )
            stack.callback(self.pool.shutdown)
            self.pool.call("prepare", [cfg.fitness.search_split, cfg.fitness.test_split])
            changed = self.folder.meta(store).changed_layers if resume else self.pool.call("changed_layers")
            self.space = SearchSpace(cfg.search_space, self.experts, self.models.num_layers(), changed)
            if not resume:
                # config.yaml first: the store, which appears whole with the run's meta, makes the run
                self.folder.path.mkdir(parents=True, exist_ok=True)
                self.folder.write_text("config.yaml", yaml.safe_dump(stored_config(cfg), sort_keys=False))
                store = self.folder.create_store(
                    config=stored_config(cfg),
                    models=self._models_spec(),
                    keyed_stream=KEYED_VERSION,
                    changed_layers=changed,
                    genes=self.space.describe(),
                )
                stack.callback(store.close)
            progress = (
                no_progress if self.console is None else functools.partial(report.progress, self.console)
            )
            self.evals = Evaluations(self.folder, store, self.pool, self.scorer, progress)
            # who runs it, for the report's status (a process killed with -9 leaves it: "stopped" then)
            self.folder.meta(store).update(running={"host": socket.gethostname(), "pid": os.getpid()})
            try:
                yield RunSession(
                    cfg,
                    self.space,
                    self.experts,
                    self.folder,
                    self.pool,
                    self.evals,
                    self.scorer,
                    self.refresh_report,
                )
            finally:
                with contextlib.suppress(Exception):
                    self.folder.meta(store).update(running=None)
                if not self.folder.finished():
                    self.refresh_report()  # status: stopped
