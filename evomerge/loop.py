"""The search loop: pymoo's ask/tell over genomes, one generation at a time. The algorithm object is the
state: it is checkpointed in the store after each generation and restored on resume (algorithms that
cannot be pickled, such as CMA-ES, are set up afresh and replay their generations, every evaluation
answered from the store)."""

from __future__ import annotations

import pickle
import time
from typing import Any

import numpy as np

from evomerge import calibration, estimation
from evomerge.adaptive import Race
from evomerge.algorithms import FAILED_F, make_algorithm, setup, spec_for
from evomerge.errors import EvomergeError
from evomerge.jobs import Job, Origin
from evomerge.objectives import front_of, signed
from evomerge.session import RunSession
from evomerge.store import Candidate, Kind, Status, StoreFullError


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


def to_F(c: Candidate, objectives: Any) -> np.ndarray:
    """A candidate's objective values as pymoo minimises them (failed: FAILED_F everywhere)."""
    if c.status != Status.OK:
        return np.full(len(objectives), FAILED_F)
    return signed(c, objectives)


def initial_population(session: RunSession) -> np.ndarray | None:
    """``algorithm.initial: experts``: one genome per expert that reproduces it, then random genomes
    (seeded by the run's seed) up to pop_size; None for the algorithm's own random start."""
    cfg = session.config
    if cfg.algorithm.initial == "random":
        return None
    experts = np.stack([session.space.expert_genome(e) for e in session.experts])
    if spec_for(cfg.algorithm.name).options_from:  # an optuna sampler proposes the rest itself
        return experts
    rng = np.random.default_rng(cfg.seed)
    rest = rng.random((cfg.algorithm.pop_size - len(experts), session.space.n_var))
    return np.concatenate([experts, rest])


def race_bound(session: RunSession, generation: int) -> Race | None:
    """What generation ``generation``'s raced candidates must be able to beat: the front of the rated
    search candidates of the generations before it (None before any), so a resumed run races alike."""
    from scipy.stats import norm

    cfg = session.config
    earlier = [c for c in session.evals.store.candidates(Kind.SEARCH) if (c.generation or 0) < generation]
    front = front_of(earlier, cfg.objectives)
    if not front:
        return None
    confidence = max(o.race_confidence for o in cfg.objectives if o.race)
    return Race(
        tuple(o.direction for o in cfg.objectives),
        tuple(tuple(c.objectives[o.name] for o in cfg.objectives) for c in front),
        float(norm.ppf(confidence)),
    )


def _restore(session: RunSession, problem: Any) -> tuple[Any, int]:
    """The algorithm and the generation it finished: from the last checkpoint, or set up afresh."""
    cfg = session.config
    last = session.evals.store.last_checkpoint() if spec_for(cfg.algorithm.name).checkpoints else None
    if last is not None:
        generation, algorithm = last
        return algorithm, generation
    algorithm = make_algorithm(
        cfg.algorithm.name,
        cfg.algorithm.pop_size,
        dict(cfg.algorithm.options),
        len(cfg.objectives),
        initial_population(session),
    )
    algorithm = setup(algorithm, cfg.algorithm.name, problem, cfg.algorithm.generations, cfg.seed)
    if hasattr(algorithm, "warm_start"):  # a surrogate learns from every model already evaluated
        known = _known_genomes(session)
        if known is not None:
            algorithm.warm_start(*known)
    return algorithm, 0


def _known_genomes(session: RunSession) -> tuple[np.ndarray, np.ndarray] | None:
    """The genomes the store already holds whole-split values of, as (X, F): the calibration's random
    merges and the base and experts where the genome expresses them (None: none)."""
    cfg = session.config
    known = [
        c
        for c in session.evals.store.candidates(Kind.CALIBRATION, cfg.fitness.search_split)
        if c.status == Status.OK and c.genome is not None and len(c.genome) == session.space.n_var
    ]
    if not known:
        return None
    return np.array([c.genome for c in known]), np.stack([to_F(c, cfg.objectives) for c in known])


def _checkpoint(session: RunSession, generation: int, algorithm: Any) -> None:
    if not spec_for(session.config.algorithm.name).checkpoints:
        return
    try:
        session.evals.store.save_checkpoint(generation, algorithm)
    except (TypeError, AttributeError, pickle.PicklingError):
        pass  # a state that does not pickle: a resume replays the generations, answered from the store
    except StoreFullError:
        raise EvomergeError(session.evals.disk_full_message()) from None


def calibrate_bank(session: RunSession, refit: bool = True) -> Any:
    """The IRT stage alone, for `evomerge calibrate`: the bank it built or extended, saved."""
    cfg = session.config
    n_items = session.pool.call("n_items", cfg.fitness.search_split)
    models = session.folder.meta(session.evals.store).models or {}
    stage = estimation.IrtStage(
        session.evals,
        session.space,
        session.experts,
        cfg,
        n_items,
        session.folder.irt,
        estimation.input_ids(models, cfg.zoo.cache_dir),
        origin="calibrate",
    )
    scopes = list(dict.fromkeys(o.of for o in cfg.objectives if o.estimator)) or ["mean"]
    stage.fit_scopes(scopes, refit=refit)
    stage.changed = True
    stage.save_bank()
    return stage.bank


def run_generations(session: RunSession, seconds_before: float = 0.0) -> float:
    """Run the search's generations (from its last checkpoint) and return the search's wall seconds,
    ``seconds_before`` (a resumed run's earlier seconds) included."""
    from pymoo.core.evaluator import Evaluator as PymooEvaluator
    from pymoo.core.problem import Problem
    from pymoo.problems.static import StaticProblem

    cfg, space, evals = session.config, session.space, session.evals
    start = time.time() - seconds_before
    items = None
    if cfg.fitness.tasks:
        n_items = session.pool.call("n_items", cfg.fitness.search_split)
        items = choose_items(n_items, cfg.fitness.items, cfg.seed)
        if any(o.estimator for o in cfg.objectives):
            models = session.folder.meta(evals.store).models or {}
            inputs = estimation.input_ids(models, cfg.zoo.cache_dir) if models else {}
            session.scorer.use(
                estimation.prepare_estimators(
                    evals, space, session.experts, cfg, n_items, session.folder.irt, inputs
                )
            )
            items = calibration.union_items(list(session.scorer.subsets.values()))
    adaptive = [s for s in session.scorer.subsets.values() if isinstance(s, calibration.AdaptiveObjective)]
    problem = Problem(n_var=space.n_var, n_obj=len(cfg.objectives), xl=0.0, xu=1.0)
    algorithm, generation = _restore(session, problem)
    session.refresh(None, None)  # what runs, and calibration's cost, before the first generation
    began, done = time.time(), 0
    while algorithm.has_next():
        generation += 1
        pop = algorithm.ask()
        X = pop.get("X")
        race = race_bound(session, generation) if any(o.race for o in cfg.objectives) else None
        jobs = [
            Job(
                i,
                space.decode(x),
                cfg.fitness.search_split,
                items,
                Origin(Kind.SEARCH, generation=generation, genome=[float(v) for v in x]),
                adaptive=tuple(a.spec([float(v) for v in x]) for a in adaptive) or None,
                race=race,
            )
            for i, x in enumerate(X)
        ]
        results = evals.evaluate(jobs, f"generation {generation}/{cfg.algorithm.generations}")
        F = np.stack([to_F(results[i], cfg.objectives) for i in range(len(X))])
        PymooEvaluator().eval(StaticProblem(problem, F=F), pop)
        algorithm.tell(infills=pop)
        _checkpoint(session, generation, algorithm)
        evals.write_meta(search_seconds=time.time() - start)
        done += 1
        left = (time.time() - began) / done * max(cfg.algorithm.generations - generation, 0)
        session.refresh(generation, left)
    return time.time() - start
