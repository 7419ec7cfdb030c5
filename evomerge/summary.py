"""The end of a run, computed once, in one place: its Pareto front, its best model (``objectives.best_of``,
which ``Run.best_id`` asks too), the test-split evaluations, and what the run folder says about them
(``best_model/``, ``front.csv``, ``summary.json``, written last: a folder with it is a finished run)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from evomerge import calibration, preflight, report
from evomerge.errors import EvomergeError
from evomerge.estimation import add_to_bank, input_ids
from evomerge.evaluations import first_line
from evomerge.jobs import Job, Origin
from evomerge.objectives import PICK_RULE, best_of, depth, front_of
from evomerge.recipe import Recipe
from evomerge.session import RunSession
from evomerge.store import Candidate, Kind, Status

MEASURED = "the whole search split: the re-scored front and the calibration models"


def finish(session: RunSession, search_seconds: float) -> dict[str, Any]:
    """Re-score the front where the search's values were estimates, pick the best model, evaluate the
    front, the best model, the base and the experts on the test split, and write the run folder's
    results. Returns the summary."""
    cfg, evals, folder = session.config, session.evals, session.folder
    everything = evals.store.candidates(kind=Kind.SEARCH)
    front = front_of(everything, cfg.objectives)
    if not front:
        raise EvomergeError(all_failed_message(everything, folder.path))
    estimation = None
    if session.scorer.subsets:  # the estimators' error report re-scores the front on the whole search split
        estimation, _ = calibration.estimation_report(evals, session.scorer.subsets, front, cfg)
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
        for name, r in session.space.reference_recipes().items()
    ]
    test = evals.evaluate(jobs, "test split")
    failed = [k for k, c in test.items() if c.status != Status.OK]
    if failed:
        raise EvomergeError(f"test-split evaluation failed for {failed}: {test[failed[0]].error}")
    _save_best(session, Recipe.from_dict(best.recipe))
    names = [o.name for o in cfg.objectives]
    summary = {
        "objectives": names,
        "best": test["best"].objectives,
        "best_candidate": best.id,
        **({"best_label": best.label} if best.kind == Kind.CALIBRATION else {}),
        "best_recipe": report.recipe_summary(best.recipe),
        **(
            {"best_depth": depth(best.recipe), "best_flow": report.flow_text(best.recipe)}
            if best.recipe.get("flow")
            else {}
        ),
        "base": test[("ref", "base")].objectives,
        "experts": {e: test[("ref", e)].objectives for e in session.experts},
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
        "best_picked_how": PICK_RULE,
        **({"estimation": estimation} if estimation else {}),
        "search_seconds": round(search_seconds, 1),
    }
    added = _grow_bank(session)
    if added:
        summary["bank"] = added
    try:  # summary.json last: a run folder with it is a finished run
        report.write_front_csv(folder, front, {c.id: test[("front", c.id)] for c in front}, cfg.objectives)
        folder.write_text("summary.json", json.dumps(summary, indent=2))
    except OSError as e:
        if preflight.disk_full(e):
            raise EvomergeError(evals.disk_full_message()) from None
        raise
    evals.write_meta(stopped_on=None)
    return summary


def _grow_bank(session: RunSession) -> dict[str, Any] | None:
    """Add the run's whole-split evaluations on the search split (the base, the experts, the re-scored
    front, full-fitness candidates) to its item bank: the next fit learns from them."""
    cfg, evals = session.config, session.evals
    if cfg.estimation.bank == "none" or not cfg.fitness.tasks:
        return None
    ok = [c for c in evals.store.candidates() if c.status == Status.OK]
    if not any(c.split == cfg.fitness.search_split and c.subset is None for c in ok):
        return None  # nothing whole-split to add (the demo's item subsets): no model is hashed
    n_items = session.pool.call("n_items", cfg.fitness.search_split)
    models = session.folder.meta(evals.store).models
    if not n_items or not models:
        return None
    inputs = input_ids(models, cfg.zoo.cache_dir)
    added, path = add_to_bank(cfg, n_items, ok, inputs, session.space, session.folder.path)
    return {"path": str(path), "added": added} if added else None


def _save_best(session: RunSession, recipe: Recipe) -> None:
    """best_model/ written whole or not at all (a temporary folder renamed into place)."""
    folder = session.folder
    tmp = Path(tempfile.mkdtemp(prefix=".best_model-", dir=folder.path))
    try:
        session.pool.call("save", recipe, str(tmp))
        if folder.best_model.exists():
            shutil.rmtree(folder.best_model)
        tmp.rename(folder.best_model)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if preflight.disk_full(e):
            raise EvomergeError(session.evals.disk_full_message()) from None
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
