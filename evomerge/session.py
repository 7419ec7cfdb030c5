"""The typed seam between a Search and the code that drives its run: the ``RunSession`` that the loop
(:mod:`evomerge.loop`) and the end of a run (:mod:`evomerge.summary`) are handed, the ``Scorer`` that
alone holds the estimators' item subsets, and the ``Refresh`` callback through which a caller (the
CLI) rewrites the run's report, so the engine imports no view."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvomergeError
from evomerge.jobs import EvalResult, Job
from evomerge.store import Candidate, Kind

if TYPE_CHECKING:
    from evomerge.config import ObjectiveConfig, RunConfig
    from evomerge.evaluations import Evaluations
    from evomerge.runfolder import RunFolder
    from evomerge.searchspace import SearchSpace


@dataclass(frozen=True)
class RunState:
    """What a report refresh is told: the run folder, how to read its store now (meta, candidates: read
    inside the refresh, so a store that cannot be read is the refresh's warning, never the run's stop),
    the generation that finished (None: before the first, or at the end) of how many, and the time left."""

    run_dir: Path
    read: Callable[[], tuple[dict[str, Any], list[Candidate]]]
    generation: int | None
    generations: int
    seconds_left: float | None


Refresh = Callable[[RunState], None]


class Scorer:
    """A finished evaluation's objective values. It alone holds the estimators' item subsets (objective
    name -> subset), set once by the loop through :meth:`use`: a search candidate scored on its subsets
    gets, for objectives with an estimator, the IRT estimate of its full-split value."""

    def __init__(self, objectives: list[ObjectiveConfig]):
        self.objectives = objectives
        self._subsets: dict[str, Any] = {}

    @property
    def subsets(self) -> Mapping[str, Any]:
        return self._subsets

    def use(self, subsets: Mapping[str, Any]) -> None:
        self._subsets = dict(subsets)

    def __call__(self, job: Job, result: EvalResult) -> dict[str, float]:
        values = result.values or {}
        if job.origin.kind == Kind.SEARCH and self._subsets:
            out = {}
            for o in self.objectives:
                sub = self._subsets.get(o.name)
                if result.adaptive and o.name in result.adaptive:  # the worker's adaptive test
                    out[o.name] = float(result.adaptive[o.name].estimate)
                elif sub is not None:
                    out[o.name] = sub.estimate(result.responses, job.origin.genome)[0]
                else:
                    out[o.name] = _value(o, values)
            return out
        return {o.name: _value(o, values) for o in self.objectives}


def _value(o: Any, values: dict[str, float]) -> float:
    if o.of not in values:
        raise EvomergeError(
            f"fitness returned no value {o.of!r} for objective {o.name!r}; it returned: {', '.join(values)}"
        )
    return values[o.of]


@dataclass
class RunSession:
    """One run's working parts for as long as its store and workers are open (``Search.session()``):
    the config, the search space (the genes the workers found), the experts in order, the run folder,
    the worker pool, the evaluations between them, the scorer and the report refresh."""

    config: RunConfig
    space: SearchSpace
    experts: list[str]
    folder: RunFolder
    pool: Any  # a WorkerPool: ``call(method, *args)`` on one worker
    evals: Evaluations
    scorer: Scorer
    refresh: Callable[[int | None, float | None], None]
