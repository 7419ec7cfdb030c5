"""Objectives, in one place: their config (``ObjectiveConfig``), values signed as a minimisation problem, the Pareto front of a
run's search candidates, the best-model pick and the data flow's depth objective. Light to import
(numpy; pymoo only when a front of several objectives is sorted), so the read side (``Run``, the
terminal report, the HTML page) needs neither torch nor the merge kernels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import EvomergeError
from evomerge.store import Candidate, Kind, Status

if TYPE_CHECKING:
    from evomerge.recipe import Recipe

DEPTH = "depth"  # an objective of the data flow's decoder layers, counted by the worker

PICK_RULE = (
    "the front member with the best mean of its objective values (signed so that lower is better; "
    "objectives of depth, a size rather than a score, only break ties), the lowest candidate id on ties"
)


class ObjectiveConfig(BaseModel):
    """One objective of a run (``objectives:`` in the config): what it measures, its direction and how
    it is estimated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    of: str = Field(
        "mean",
        description="a task name or 'mean' (mean accuracy over tasks); with a fitness function, a key it "
        "returns; depth: the decoder layers of a data-flow candidate (direction: min)",
    )
    metric: str | dict[str, str] | None = Field(
        None,
        description="the task's metric (lm-eval's name: acc, acc_norm, exact_match, ...); default: its "
        "first; with of: mean, every task's, or a mapping of task name -> metric",
    )
    filter: str | dict[str, str] | None = Field(
        None,
        description="the filter the task's answers pass before scoring (GSM8K: strict-match, "
        "flexible-extract); default: its first; with of: mean, every task's, or a mapping of task name -> filter",
    )
    direction: Literal["max", "min"] = "max"
    estimator: str | None = Field(
        None,
        description="estimate the full-split accuracy from `items` items with IRT (null: plain accuracy): "
        "a name registered in evomerge.irt.ESTIMATORS; sgpirt also uses a surrogate of accuracy over "
        "genomes fitted on the calibration models",
    )
    items: Annotated[int, Field(ge=1)] | Literal["adaptive"] | None = Field(
        None,
        description="subset size for the estimator, or adaptive: items chosen one batch at a time by "
        "Fisher information at the candidate's current ability, until the estimate is precise enough",
    )
    selection: Literal["random", "anchor", "information"] = "random"
    max_items: int | None = Field(None, ge=1, description="items: adaptive: at most this many (default 50)")
    target_se: float | None = Field(
        None,
        gt=0,
        description="items: adaptive: stop once the estimate's standard error is this small (default 0.05)",
    )
    race: bool = Field(
        False,
        description="items: adaptive: also stop a candidate once it cannot, with race_confidence, reach the "
        "best so far (one objective) or leave the region the front dominates (several)",
    )
    race_confidence: float = Field(0.95, gt=0.5, lt=1.0)

    @model_validator(mode="after")
    def _adaptive_only(self) -> ObjectiveConfig:
        if self.items != "adaptive":
            given = [k for k in ("max_items", "target_se") if getattr(self, k) is not None]
            given += ["race"] if self.race else []
            if given:
                raise EvomergeError(f"objective {self.name!r}: {given[0]} applies only with items: adaptive")
        elif self.estimator is not None:
            from evomerge.irt import ESTIMATORS, get_estimator

            if not get_estimator(self.estimator).adaptive:
                able = ", ".join(n for n in ESTIMATORS if ESTIMATORS.get(n).adaptive)
                raise EvomergeError(
                    f"objective {self.name!r}: items: adaptive needs an estimator with a standard error "
                    f"({able}); {self.estimator} has none"
                )
        return self

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, v: str | None) -> str | None:
        if v is not None:
            from evomerge.irt import get_estimator

            get_estimator(v)
        return v


def signed(c: Candidate, objectives: Sequence[Any]) -> np.ndarray:
    """Objective values as a minimisation problem (``max`` objectives negated)."""
    return np.array(
        [-c.objectives[o.name] if o.direction == "max" else c.objectives[o.name] for o in objectives]
    )


def scored(objectives: Sequence[Any]) -> list[Any]:
    """The objectives a fitness computes: all but those of depth, which the worker counts itself."""
    return [o for o in objectives if o.of != DEPTH]


def pareto_front(candidates: Sequence[Candidate], objectives: Sequence[Any]) -> list[Candidate]:
    """Non-dominated candidates (distinct recipes), best first for one objective."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    unique = list({c.recipe_key: c for c in candidates}.values())
    F = np.stack([signed(c, objectives) for c in unique])
    if len(objectives) == 1:
        best = F[:, 0].min()
        return [unique[i] for i in np.flatnonzero(F[:, 0] == best)]
    front = NonDominatedSorting().do(F, only_non_dominated_front=True)
    return sorted((unique[i] for i in front), key=lambda c: tuple(signed(c, objectives)))


def front_of(records: Sequence[Candidate], objectives: Sequence[Any]) -> list[Candidate]:
    """The Pareto front of the successful search candidates (empty when there is none); candidates an
    adaptive test stopped by racing are never on it unrated."""
    searched = [
        c for c in records if c.kind == Kind.SEARCH and c.status == Status.OK and c.stopped != "raced"
    ]
    return pareto_front(searched, objectives) if searched else []


def pick_best(
    front: Sequence[Candidate], objectives: Sequence[Any], measured: dict[int, Candidate] | None = None
) -> Candidate:
    """The candidate with the best mean of its (signed) objective values, objectives of depth left to
    break ties (a mean with them would rank by size: layers outnumber accuracy points); earliest on
    ties. ``measured`` (candidate id -> its evaluation on the whole search split) ranks by those values
    instead of the candidates' own, e.g. when the search's values are IRT estimates."""
    ranked = scored(objectives) or list(objectives)
    sizes = [o for o in objectives if o not in ranked]

    def score(c: Candidate) -> tuple[float, float, int]:
        values = measured[c.id] if measured else c
        size = float(signed(values, sizes).mean()) if sizes else 0.0
        return float(signed(values, ranked).mean()), size, c.id

    return min(front, key=score)


def pick_best_measured(
    front: Sequence[Candidate],
    calibrated: Sequence[Candidate],
    full: dict[int, Candidate],
    objectives: Sequence[Any],
) -> Candidate:
    """With estimated objectives: the best on measured values only, among the front (``full``: each
    member's evaluation on the whole search split) and the calibration models (base, experts, random
    merges), which calibration measured on that split already."""
    return pick_best([*front, *calibrated], objectives, {**full, **{c.id: c for c in calibrated}})


def best_of(
    records: Sequence[Candidate], objectives: Sequence[Any], search_split: str
) -> tuple[Candidate, bool] | None:
    """The run's best model and whether it was picked on measured values. With estimated objectives,
    once the front has been re-scored on the whole search split, the best on measured values among the
    front and the calibration models (base, experts, random merges); otherwise the front member with
    the best mean of its objectives (PICK_RULE). None without a successful search candidate."""
    front = front_of(records, objectives)
    if not front:
        return None
    if any(o.estimator for o in objectives):
        full = {
            c.recipe_key: c
            for c in records
            if c.split == search_split
            and c.subset is None
            and c.kind != Kind.SEARCH
            and c.status == Status.OK
        }
        if all(c.recipe_key in full for c in front):
            calibrated = [c for c in records if c.kind == Kind.CALIBRATION and c.status == Status.OK]
            measured = {c.id: full[c.recipe_key] for c in front}
            return pick_best_measured(front, calibrated, measured, objectives), True
    return pick_best(front, objectives), False


def depth_values(recipe: Recipe) -> dict[str, float]:
    """What a worker adds to a candidate's values for objectives ``of: depth``: a data-flow recipe's
    decoder layers under ``DEPTH``; nothing for a recipe without a flow."""
    return {} if recipe.flow is None else {DEPTH: float(len(recipe.flow))}


def depth(recipe: dict[str, Any]) -> int | None:
    """A recipe's decoder layers where it has a data flow (None: the base's layers, no flow)."""
    flow = recipe.get("flow")
    return len(flow) if flow else None
