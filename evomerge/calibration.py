"""IRT fitness: estimate each candidate's full-split accuracy from a small item subset (MERGE^3), per
objective, with item parameters calibrated on the user's own tasks.

An objective with ``estimator`` set is scored on ``items`` items of its scope (its task, or every task's
items together for ``of: mean``), chosen once with ``selection`` from the fitted parameters, or on the
items an adaptive test picks (``items: adaptive``). A calibration evaluates the base, the experts and
``random_merges`` random merges on the search split's items (all, or a sample stratified by task, which
the estimates are then about), stored as ``kind="calibration"``. What an objective's estimator gets
besides the candidate's answers is what its registration declares (:func:`evomerge.irt.estimator`): the
endpoint abilities (of the base and the experts), anchor weights, and, for one that needs a prior
(``sgpirt``), the prediction for the candidate's genome of a Gaussian process of accuracy over genomes
(:class:`evomerge.irt.Surrogate`). Where the parameters come from (a bank, a calibration) is
:mod:`evomerge.estimation`'s part.
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
        import json

        folder.mkdir(parents=True, exist_ok=True)
        self.params.save(folder / f"{self.name}.json")
        np.save(folder / f"{self.name}.endpoints.npy", self.endpoint_thetas)
        (folder / f"{self.name}.items.json").write_text(json.dumps([list(c) for c in self.cols]))

    @classmethod
    def load(cls, folder: Path, name: str, cols: list[Column]) -> Scope | None:
        path = folder / f"{name}.json"
        if not path.is_file():
            return None
        params = irt.IrtParams.load(path)
        items = folder / f"{name}.items.json"
        if items.is_file():  # a sample of the scope's items (or a bank's): what the estimates are about
            import json

            cols = [(str(t), str(i)) for t, i in json.loads(items.read_text())]
        if params.n_items != len(cols):
            raise EvomergeError(
                f"IRT parameters {str(path)!r} cover {params.n_items} items, scope {name!r} has {len(cols)}"
            )
        ends = folder / f"{name}.endpoints.npy"
        thetas = np.load(ends) if ends.is_file() else np.zeros((0, params.dims))
        return cls(name, cols, params, thetas)


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


def input_genome(space: Any, label: str) -> list[float] | None:
    """The genome that reproduces the base or an expert, where the search space can express it (the
    surrogate then learns the corners the search starts from); None elsewhere."""
    try:
        x = space.base_genome() if label == "base" else space.expert_genome(label)
    except EvomergeError:
        return None
    return [float(v) for v in x]


def calibrate(
    evals: Any,
    space: Any,
    config: Any,
    items: dict[str, list[int]] | None,
    labels: Sequence[str] | None = None,
    random_merges: int | None = None,
    first: int = 0,
) -> list[Any]:
    """Evaluate the base and the experts (those in ``labels``; all by default) and ``random_merges``
    random merges (default: the config's) on ``items`` of the search split (None: all of it), stored as
    ``kind="calibration"``; the base and the experts come first. ``first``: the index of the first
    random merge (a calibration that adds merges to a bank's draws the next ones)."""
    from evomerge.jobs import Job, Origin
    from evomerge.store import Kind, Status

    fit = config.fitness
    n = random_merges if random_merges is not None else random_merge_count(config)
    recipes = [
        (label, r, input_genome(space, label))
        for label, r in space.reference_recipes().items()
        if labels is None or label in labels
    ]
    genomes = calibration_genomes(space, config.seed, first + n)[first:]
    recipes += [
        (f"random-{first + i}", space.decode(g), [float(v) for v in g]) for i, g in enumerate(genomes)
    ]
    jobs = [
        Job(i, r, fit.search_split, items, Origin(Kind.CALIBRATION, label=label, genome=g))
        for i, (label, r, g) in enumerate(recipes)
    ]
    done = evals.evaluate(jobs, "calibration")
    failed = [c for c in done.values() if c.status != Status.OK]
    if failed:
        raise EvomergeError(f"calibration evaluation failed: {failed[0].error}")
    return [done[i] for i in range(len(jobs))]


def random_merge_count(config: Any) -> int:
    """The calibration's random merges: the config's number, or for ``auto`` the fewest the estimators
    need (what sgpirt's surrogate learns from; 4 otherwise, so that a fit has the base, the experts and
    as many merges between them)."""
    n = config.fitness.calibration.random_merges
    if n != "auto":
        return int(n)
    needed = [irt.get_estimator(o.estimator).min_calibration_merges for o in config.objectives if o.estimator]
    return max([4, *needed])


def search_item_budget(config: Any) -> int:
    """The item evaluations the search itself makes at most: candidates x items per candidate."""
    per = [
        (o.max_items or DEFAULT_MAX_ITEMS) if o.items == "adaptive" else int(o.items)
        for o in config.objectives
        if o.estimator
    ]
    return config.algorithm.pop_size * config.algorithm.generations * max(per, default=0)


def calibration_items(config: Any, n_items: dict[str, int], n_models: int) -> dict[str, list[int]] | None:
    """The items a calibration of ``n_models`` models evaluates, which the estimates are then about:
    every item (None), or a sample stratified by task (each task its share, drawn with the run's seed
    + 2). ``auto``: every item up to 200 in all; else as many as make the calibration cost about what the
    search costs (``search_item_budget``), at least 100."""
    total = sum(n_items.values())
    k = config.fitness.calibration.items
    if k == "auto":
        k = total if total <= 200 else max(100, search_item_budget(config) // max(n_models, 1))
    if k == "all" or k >= total:
        return None
    rng = np.random.default_rng(config.seed + 2)
    out = {}
    for task, n in n_items.items():
        share = max(1, round(k * n / total))
        out[task] = sorted(int(i) for i in rng.choice(n, size=min(share, n), replace=False))
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
    settings, so a resumed run does not fit again (nor sees the subjects a bank gained since)."""
    import json

    path = folder / f"{scope.name}.adaptive.json"
    settings = {
        "target_se": target_se,
        "max_items": max_items,
        "model": model,
        "seed": seed,
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
