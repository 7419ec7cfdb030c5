"""IRT fitness: calibrate item parameters on the user's own tasks, then estimate each candidate's
full-split accuracy from a small item subset (MERGE^3), per objective.

An objective with ``estimator`` set is scored on ``items`` items of its scope (its task, or every task's
items together for ``of: mean``), chosen once with ``selection`` from the fitted parameters. Calibration
evaluates the base, every expert and ``random_merges`` random merges on the whole search split (stored
as ``kind="calibration"``), fits one IRT model per scope with py-irt, and saves it as
``RUN_DIR/irt/<scope>.json`` (reused on resume; ``calibration.params`` names a folder of such files
fitted elsewhere, which makes calibration free). What an objective's estimator gets besides the
candidate's answers is what its registration declares (:func:`evomerge.irt.estimator`): the endpoint
abilities (fitted on the base and the experts), anchor weights, and, for one that needs a prior
(``sgpirt``), the prediction for the candidate's genome of a Gaussian process of accuracy over genomes
(:class:`evomerge.irt.Surrogate`), fitted per scope on the calibration models that have a genome: the
random merges, and the base and the experts where the search space can reproduce them. It is refitted
from the stored calibration on every start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evomerge import irt
from evomerge.adaptive import AdaptiveSpec, Column
from evomerge.errors import EvomergeError


def columns(n_items: dict[str, int], scope: str) -> list[Column]:
    """The items an objective of ``scope`` ("mean" = every task) is about, in a fixed order."""
    tasks = list(n_items) if scope == "mean" else [scope]
    return [(t, str(i)) for t in tasks for i in range(n_items[t])]


def response_matrix(responses: list[dict[str, dict[str, float]]], cols: list[Column]) -> np.ndarray:
    """Subjects x items of 0/1 from stored per-item responses (every item must be present)."""
    try:
        return np.array([[r[t][i] for t, i in cols] for r in responses], dtype=float)
    except KeyError as e:
        raise EvomergeError(f"calibration responses lack item {e}; evaluate the full split") from None


@dataclass
class Scope:
    """One objective scope's fitted parameters, its items, and the endpoint models' abilities."""

    name: str
    cols: list[Column]
    params: irt.IrtParams
    endpoint_thetas: np.ndarray
    surrogate: irt.Surrogate | None = None  # accuracy over genomes, for sgpirt (refitted, not saved)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.params.save(folder / f"{self.name}.json")
        np.save(folder / f"{self.name}.endpoints.npy", self.endpoint_thetas)

    @classmethod
    def load(cls, folder: Path, name: str, cols: list[Column]) -> Scope | None:
        path = folder / f"{name}.json"
        if not path.is_file():
            return None
        params = irt.IrtParams.load(path)
        if params.n_items != len(cols):
            raise EvomergeError(
                f"IRT parameters {str(path)!r} cover {params.n_items} items, scope {name!r} has {len(cols)}"
            )
        ends = folder / f"{name}.endpoints.npy"
        thetas = np.load(ends) if ends.is_file() else np.zeros((0, params.dims))
        return cls(name, cols, params, thetas)


def fit_scope(
    name: str,
    cols: list[Column],
    responses: list[dict[str, dict[str, float]]],
    n_endpoints: int,
    model: str,
    seed: int,
) -> Scope:
    """Fit ``model`` on the calibration responses; the first ``n_endpoints`` subjects are the base and
    the experts, whose abilities (from every item) the mp estimators combine."""
    y = response_matrix(responses, cols)
    params = irt.fit_irt(y, model=model, seed=seed)
    everything = np.arange(len(cols))
    thetas = np.stack([irt.fit_ability(params, everything, y[j]) for j in range(n_endpoints)])
    return Scope(name, cols, params, thetas)


def fit_surrogate(
    scope: Scope, genomes: list[list[float]], responses: list[dict[str, dict[str, float]]], seed: int
) -> None:
    """Fit ``scope.surrogate`` on calibration models: their genomes and whole-split responses."""
    acc = response_matrix(responses, scope.cols).mean(axis=1)
    scope.surrogate = irt.fit_surrogate(np.asarray(genomes, dtype=float), acc, seed)


@dataclass
class Subset:
    """The items one objective is scored on: positions in its scope, and anchor weights if any."""

    objective: str
    scope: Scope
    idx: np.ndarray
    estimator: str
    weights: np.ndarray | None = None
    items: list[Column] = field(init=False)

    def __post_init__(self) -> None:
        self.items = [self.scope.cols[i] for i in self.idx]

    def estimate(
        self, responses: dict[str, dict[str, float]], genome: list[float] | None = None
    ) -> tuple[float, float]:
        """(estimated full-scope accuracy, plain subset mean) from a candidate's responses (and, for
        sgpirt, its genome)."""
        try:
            y = np.array([responses[t][i] for t, i in self.items], dtype=float)
        except KeyError as e:
            raise EvomergeError(f"objective {self.objective!r}: no response for item {e}") from None
        estimator = irt.get_estimator(self.estimator)
        ends = self.scope.endpoint_thetas if estimator.needs_endpoints else None
        prior = None
        if estimator.needs_prior:
            if self.scope.surrogate is None or genome is None:
                raise EvomergeError(
                    f"objective {self.objective!r}: {self.estimator} needs a fitted surrogate and the genome"
                )
            prior = self.scope.surrogate.predict(genome)
        value = estimator(self.scope.params, self.idx, y, ends, self.weights, prior)
        return float(value), float(y.mean())


def select(objective: str, scope: Scope, n: int, method: str, estimator: str, seed: int) -> Subset:
    if n > len(scope.cols):
        raise EvomergeError(
            f"objective {objective!r}: items={n} exceeds the {len(scope.cols)} items of {scope.name!r}"
        )
    idx = irt.select_items(scope.params, n, method, seed=seed)
    weights = irt.anchor_weights(scope.params, idx) if method == "anchor" else None
    return Subset(objective, scope, np.asarray(idx), estimator, weights)


def union_items(subsets: list[Subset | AdaptiveObjective]) -> dict[str, list[int]] | None:
    """Per task, the sorted item ids any objective needs: what each candidate is evaluated on (None:
    adaptive tests choose them per candidate)."""
    out: dict[str, set[int]] = {}
    if any(isinstance(s, AdaptiveObjective) for s in subsets):
        return None
    for s in subsets:
        for t, i in s.items:
            out.setdefault(t, set()).add(int(i))
    return {t: sorted(ids) for t, ids in out.items()}


def describe_cost(calibration: list[Any], searched: list[Any], full_items: int) -> dict[str, float]:
    """What IRT fitness saved per candidate against full-split fitness, and what calibration cost."""
    full_tokens = float(np.mean([c.n_tokens for c in calibration])) if calibration else float("nan")
    items = float(np.mean([c.n_items for c in searched]))
    tokens = float(np.mean([c.n_tokens for c in searched]))
    return {
        "items_per_candidate": items,
        "full_items_per_candidate": float(full_items),
        "item_reduction": full_items / items,
        "tokens_per_candidate": tokens,
        "full_tokens_per_candidate": full_tokens,
        "token_reduction": full_tokens / tokens,
        "calibration_subjects": len(calibration),
        "calibration_seconds": float(sum(c.wall_s for c in calibration)),
    }


# --- the IRT stage of a run --------------------------------------------------------------------------


def calibration_genomes(space: Any, seed: int, n: int) -> list[np.ndarray]:
    """The calibration's random merges, uniform in the genome space (seeded by the run's seed + 1)."""
    rng = np.random.default_rng(seed + 1)
    return [rng.random(space.n_var) for _ in range(n)]


def _input_genome(space: Any, label: str) -> list[float] | None:
    """The genome that reproduces the base or an expert, where the search space can express it (the
    surrogate then learns the corners the search starts from); None elsewhere."""
    try:
        x = space.base_genome() if label == "base" else space.expert_genome(label)
    except EvomergeError:
        return None
    return [float(v) for v in x]


def calibrate(evals: Any, space: Any, experts: list[str], config: Any) -> list[Any]:
    """Evaluate the base, the experts and random merges on the whole search split (stored as
    ``kind="calibration"``); the endpoints come first."""
    from evomerge.jobs import Job, Origin
    from evomerge.store import Kind, Status

    fit = config.fitness
    recipes = [(label, r, _input_genome(space, label)) for label, r in space.reference_recipes().items()]
    recipes += [
        (f"random-{i}", space.decode(g), [float(v) for v in g])
        for i, g in enumerate(calibration_genomes(space, config.seed, fit.calibration.random_merges))
    ]
    jobs = [
        Job(i, r, fit.search_split, None, Origin(Kind.CALIBRATION, label=label, genome=g))
        for i, (label, r, g) in enumerate(recipes)
    ]
    done = evals.evaluate(jobs, "calibration")
    failed = [c for c in done.values() if c.status != Status.OK]
    if failed:
        raise EvomergeError(f"calibration evaluation failed: {failed[0].error}")
    return [done[i] for i in range(len(jobs))]


def prepare_estimators(
    evals: Any, space: Any, experts: list[str], config: Any, n_items: dict[str, int], folder: Path
) -> dict[str, Subset | AdaptiveObjective]:
    """Each estimated objective's item subset, from saved IRT parameters (``calibration.params`` or the
    run's ``irt/`` folder) or a calibration, with sgpirt's surrogate refitted from the stored
    calibration (which re-evaluates nothing) on every start."""
    cal = config.fitness.calibration
    objectives = config.objectives
    for o in objectives:  # before anything is evaluated
        n = len(columns(n_items, o.of))
        if o.items == "adaptive" and (o.max_items or 0) > n:
            raise EvomergeError(
                f"objective {o.name!r}: max_items={o.max_items} exceeds the {n} items of {o.of!r}"
            )
    scopes: dict[str, Scope | None] = {}
    for o in objectives:
        if o.estimator and o.of not in scopes:
            scopes[o.of] = Scope.load(Path(cal.params or folder), o.of, columns(n_items, o.of))
    subjects = None
    if any(sc is None for sc in scopes.values()):
        if cal.params is not None:
            missing = [name for name, sc in scopes.items() if sc is None]
            raise EvomergeError(f"calibration.params {str(cal.params)!r} has no parameters for {missing}")
        subjects = calibrate(evals, space, experts, config)
        responses = [c.responses for c in subjects]
        for name, sc in scopes.items():
            if sc is None:
                sc = fit_scope(
                    name, columns(n_items, name), responses, 1 + len(experts), cal.model, config.seed
                )
                sc.save(folder)
                scopes[name] = sc
    surrogate = {o.of for o in objectives if o.estimator and irt.get_estimator(o.estimator).needs_prior}
    if surrogate:
        subjects = subjects or calibrate(evals, space, experts, config)
        known = [c for c in subjects if c.genome is not None]  # the random merges, base and experts
        genomes = [c.genome for c in known]
        for name in surrogate:
            fit_surrogate(scopes[name], genomes, [c.responses for c in known], config.seed)
    out: dict[str, Subset | AdaptiveObjective] = {}
    for o in objectives:
        if not o.estimator:
            continue
        if o.items != "adaptive":
            out[o.name] = select(o.name, scopes[o.of], o.items, o.selection, o.estimator, config.seed)
            continue
        scope = scopes[o.of]
        max_items = o.max_items or min(DEFAULT_MAX_ITEMS, len(scope.cols))
        target = o.target_se or DEFAULT_TARGET_SE
        check = None
        if cal.params is None:  # held-out subjects exist only where this run calibrated
            subjects = subjects or calibrate(evals, space, experts, config)
            check = check_held_out(
                scope, [c.responses for c in subjects], target, max_items, cal.model, config.seed, folder
            )
        out[o.name] = AdaptiveObjective(o.name, scope, o.estimator, target, max_items, check)
    return out


@dataclass
class AdaptiveObjective:
    """An objective scored by adaptive tests (``items: adaptive``): its scope, the tests' limits, and
    the held-out check whose mix with the plain mean its estimates use (None: no held-out subjects,
    the IRT estimate as it is)."""

    objective: str
    scope: Scope
    estimator: str
    target_se: float
    max_items: int
    check: irt.AdaptiveCheck | None = None

    def spec(self, genome: Sequence[float] | None = None) -> AdaptiveSpec:
        prior = None
        if irt.get_estimator(self.estimator).needs_prior:
            if self.scope.surrogate is None or genome is None:
                raise EvomergeError(
                    f"objective {self.objective!r}: {self.estimator} needs a fitted surrogate and the genome"
                )
            prior = self.scope.surrogate.predict(genome)
        lam, scale = (self.check.lam, self.check.se_scale) if self.check is not None else (0.0, 1.0)
        return AdaptiveSpec(
            self.objective,
            tuple(self.scope.cols),
            self.scope.params,
            self.target_se,
            self.max_items,
            lam,
            prior,
            se_scale=scale,
        )


def check_held_out(
    scope: Scope,
    responses: list[dict[str, dict[str, float]]],
    target_se: float,
    max_items: int,
    model: str,
    seed: int,
    folder: Path,
) -> irt.AdaptiveCheck:
    """The adaptive test checked on held-out calibration models: two folds, each scored with parameters
    fitted on the other (``irt.check_adaptive``); saved as ``<scope>.adaptive.json`` for the same
    settings, so a resumed run does not fit again."""
    import json

    path = folder / f"{scope.name}.adaptive.json"
    settings = {
        "target_se": target_se,
        "max_items": max_items,
        "model": model,
        "seed": seed,
        "subjects": len(responses),
    }
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return irt.AdaptiveCheck(**saved["check"])
    y = response_matrix(responses, scope.cols)
    folds = [np.arange(len(y)) % 2 == k for k in (0, 1)]
    pairs = [(irt.fit_irt(y[~held], model=model, seed=seed), y[held]) for held in folds]
    check = irt.check_adaptive(pairs, target_se=target_se, max_items=max_items, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "check": check.__dict__}, indent=1))
    return check


def estimation_report(
    evals: Any, subsets: dict[str, Subset], front: list[Any], config: Any
) -> tuple[dict[str, Any], dict[int, Any]]:
    """The estimators' error on the front (estimate vs the whole search split) and the cost saved; and
    the front's evaluations on the whole search split, by candidate id."""
    from evomerge.jobs import Job, Origin
    from evomerge.recipe import Recipe
    from evomerge.store import Kind, Status

    split = config.fitness.search_split
    jobs = [
        Job(("full", c.id), Recipe.from_dict(c.recipe), split, None, Origin(Kind.FULL, label=f"full:{c.id}"))
        for c in front
    ]
    full = evals.evaluate(jobs, "front, full search split")
    errors = {}
    for name in subsets:
        pairs = [(c.objectives[name], full[("full", c.id)].objectives[name]) for c in front]
        errors[name] = {
            "mae_on_front": float(np.mean([abs(a - b) for a, b in pairs])),
            "front": [
                {"candidate": c.id, "estimate": a, "full": b} for c, (a, b) in zip(front, pairs, strict=True)
            ],
        }
    n_full = sum(len(s.scope.cols) for s in subsets.values() if s.scope.name == "mean") or max(
        len(s.scope.cols) for s in subsets.values()
    )
    store = evals.store
    searched = [c for c in store.candidates(kind=Kind.SEARCH) if c.status == Status.OK]
    cost = describe_cost(store.candidates(kind=Kind.CALIBRATION), searched, n_full)
    return {"errors": errors, "cost": cost}, {c.id: full[("full", c.id)] for c in front}


# --- adaptive items ----------------------------------------------------------------------------------------

DEFAULT_MAX_ITEMS = 50
DEFAULT_TARGET_SE = 0.05
