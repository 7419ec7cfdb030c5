"""The end of a run, computed once, in one place: its Pareto front, its best model (``best_of``, which
``Run.best_id`` asks too), the test-split evaluations, and what the run folder says about them
(``best_model/``, ``front.csv``, ``summary.json``, written last: a folder with it is a finished run)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge import calibration, preflight, report
from evomerge.errors import EvomergeError
from evomerge.evaluations import first_line
from evomerge.jobs import Job, Origin
from evomerge.recipe import Recipe
from evomerge.store import Candidate, Kind, Status

MEASURED = "the whole search split: the re-scored front and the calibration models"


def front_of(records: Sequence[Candidate], objectives: Sequence[Any]) -> list[Candidate]:
    """The Pareto front of the successful search candidates (empty when there is none); candidates an
    adaptive test stopped by racing are never on it unrated."""
    searched = [
        c for c in records if c.kind == Kind.SEARCH and c.status == Status.OK and c.stopped != "raced"
    ]
    return report.pareto_front(searched, objectives) if searched else []


def best_of(
    records: Sequence[Candidate], objectives: Sequence[Any], search_split: str
) -> tuple[Candidate, bool] | None:
    """The run's best model and whether it was picked on measured values. With estimated objectives,
    once the front has been re-scored on the whole search split, the best on measured values among the
    front and the calibration models (base, experts, random merges); otherwise the front member with
    the best mean of its objectives (report.PICK_RULE). None without a successful search candidate."""
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
            return report.pick_best_measured(front, calibrated, measured, objectives), True
    return report.pick_best(front, objectives), False


def finish(search: Any, search_seconds: float) -> dict[str, Any]:
    """Re-score the front where the search's values were estimates, pick the best model, evaluate the
    front, the best model, the base and the experts on the test split, and write the run folder's
    results. Returns the summary."""
    cfg, evals, folder = search.config, search.evals, search.folder
    everything = evals.store.candidates(kind=Kind.SEARCH)
    front = front_of(everything, cfg.objectives)
    if not front:
        raise EvomergeError(all_failed_message(everything, folder.path))
    estimation = None
    if search.subsets:  # the estimators' error report re-scores the front on the whole search split
        estimation, _ = calibration.estimation_report(evals, search.subsets, front, cfg)
    best, measured = best_of(evals.store.candidates(), cfg.objectives, cfg.fitness.search_split)
    split = cfg.fitness.test_split
    jobs = [
        Job(
            ("front", c.id), Recipe.from_dict(c.recipe), split, None, Origin(Kind.TEST, label=f"front:{c.id}")
        )
        for c in front
    ]
    jobs.append(
        Job("best", Recipe.from_dict(best.recipe), split, None, Origin(Kind.TEST, label=f"best:{best.id}"))
    )
    jobs += [
        Job(("ref", name), r, split, None, Origin(Kind.REFERENCE, label=name))
        for name, r in search.space.reference_recipes().items()
    ]
    test = evals.evaluate(jobs, "test split")
    failed = [k for k, c in test.items() if c.status != Status.OK]
    if failed:
        raise EvomergeError(f"test-split evaluation failed for {failed}: {test[failed[0]].error}")
    _save_best(search, Recipe.from_dict(best.recipe))
    names = [o.name for o in cfg.objectives]
    summary = {
        "objectives": names,
        "best": test["best"].objectives,
        "best_candidate": best.id,
        **({"best_label": best.label} if best.kind == Kind.CALIBRATION else {}),
        "best_recipe": report.recipe_summary(best.recipe),
        **(
            {"best_depth": len(best.recipe["flow"]), "best_flow": report.flow_text(best.recipe)}
            if best.recipe.get("flow")
            else {}
        ),
        "base": test[("ref", "base")].objectives,
        "experts": {e: test[("ref", e)].objectives for e in search.experts},
        "front": [
            {
                "candidate": c.id,
                "search": {n: c.objectives[n] for n in names},
                "test": {n: test[("front", c.id)].objectives[n] for n in names},
                "recipe": report.recipe_summary(c.recipe),
                **({"flow": report.flow_text(c.recipe)} if c.recipe.get("flow") else {}),
            }
            for c in front
        ],
        "candidates_evaluated": len(everything),
        "best_picked_on": MEASURED if measured else "search values",
        "best_picked_how": report.PICK_RULE,
        **({"estimation": estimation} if estimation else {}),
        "search_seconds": round(search_seconds, 1),
    }
    try:  # summary.json last: a run folder with it is a finished run
        report.write_front_csv(folder, front, {c.id: test[("front", c.id)] for c in front}, cfg.objectives)
        folder.write_text("summary.json", json.dumps(summary, indent=2))
    except OSError as e:
        if preflight.disk_full(e):
            raise EvomergeError(evals.disk_full_message()) from None
        raise
    evals.write_meta(stopped_on=None)
    return summary


def _save_best(search: Any, recipe: Recipe) -> None:
    """best_model/ written whole or not at all (a temporary folder renamed into place)."""
    folder = search.folder
    tmp = Path(tempfile.mkdtemp(prefix=".best_model-", dir=folder.path))
    try:
        search.pool.call("save", recipe, str(tmp))
        if folder.best_model.exists():
            shutil.rmtree(folder.best_model)
        tmp.rename(folder.best_model)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if preflight.disk_full(e):
            raise EvomergeError(search.evals.disk_full_message()) from None
        raise


def all_failed_message(candidates: list[Candidate], run_dir: Path) -> str:
    errors = Counter(first_line(c.error) for c in candidates)
    error, n = errors.most_common(1)[0] if errors else ("no candidate was evaluated", 0)
    first = next((c for c in candidates if first_line(c.error) == error), None)
    where = (
        f" (candidate {first.id}; whole trace: `evomerge show {run_dir} --candidate {first.id}`)"
        if first
        else ""
    )
    return (
        f"every search candidate failed ({len(candidates)}); the most common error ({n} of "
        f"{len(candidates)}): {error}{where}"
    )
