"""The run page's text sections: what ran, the IRT fitness estimates against the truth, the answers
of a generative task, the test split and the failures."""

from __future__ import annotations

import html
import json
from typing import Any

import numpy as np
import pandas as pd

from evomerge.evaluations import first_line
from evomerge.report.common import (
    _config,
    _frame,
    _measured,
    _objective_text,
    _searched,
    _summary,
    _table,
    cost,
    wall_seconds,
)
from evomerge.report.terminal import duration, recipe_text, summary_table
from evomerge.run import Run
from evomerge.runfolder import IRT
from evomerge.store import Kind, Status


def section_what_ran(run: Run, status: str) -> str:
    """Models, search space, algorithm, objectives, seed, workers, wall time, status and cost."""
    cfg = _config(run)
    space, algo = cfg["search_space"], cfg["algorithm"]
    c = cost(run)
    genes = run.genes or []
    generations = run.candidates.generation.max()
    done = 0 if pd.isna(generations) else int(generations)
    workers = run.candidates.worker.dropna().nunique()
    rows = [
        ("status", f"{status}, generation {done} of {algo['generations']}"),
        ("base", cfg["models"]["base"]),
        *((f"expert {k}", v) for k, v in cfg["models"]["experts"].items()),
        (
            "search space",
            f"{space.get('name') or 'inline'}: {space['layer_groups']} layer groups, methods "
            f"{', '.join(space['methods'])}, genes {json.dumps(space['genes'])}"
            + (f", fixed {json.dumps(space['fixed'])}" if space.get("fixed") else "")
            + (f", lines {json.dumps(space['lines'])}" if space.get("lines") else "")
            + f"; {len(genes)} genes",
        ),
        (
            "algorithm",
            f"{algo['name']}, population {algo['pop_size']}, {algo['generations']} generations, initial "
            f"{algo.get('initial', 'random')}"
            + (f", options {json.dumps(algo['options'])}" if algo["options"] else ""),
        ),
        *(("objective", _objective_text(o)) for o in run.objectives),
        ("seed", cfg["seed"]),
        (
            "workers",
            (
                f"{cfg['workers']} configured"
                if cfg.get("workers") is not None
                else "unset (auto on a GPU, 2 on a CPU)"
            )
            + f", {workers} seen in the store",
        ),
        ("search wall time", duration(wall_seconds(run))),
        (
            "search candidates",
            f"{c['candidates']} evaluated, {c['failed']} failed"
            + (f", {c['raced']} raced" if c["raced"] else ""),
        ),
        ("models evaluated", f"{c['models']} (every kind: search, calibration, front re-scored, test split)"),
        ("items evaluated", f"{c['items']:,} ({c['search_items']:,} by search candidates)"),
        ("forward tokens", f"{c['tokens']:,}"),
    ]
    if c["calibration"]:
        rows.append(
            (
                "calibration",
                f"{c['calibration']} models, {c['calibration_items']:,} items, "
                f"{duration(c['calibration_seconds'])} worker time",
            )
        )
    return _table(rows)


# --- IRT fitness ---------------------------------------------------------------------------------------


def estimate_pairs(run: Run) -> pd.DataFrame:
    """Search candidates whose weights were also measured on the whole search split (the re-scored front,
    a calibration model with the same recipe): id, source and, per estimated objective, the estimate
    and the measured value."""
    measured, rows = _measured(run), []
    for cid, row in _searched(run).iterrows():
        if row.recipe_key not in measured.index:
            continue
        twin = measured.loc[row.recipe_key]
        source = "front, re-scored" if twin.kind == Kind.FULL else f"calibration model {twin.label}"
        values = {}
        for o in run.objectives:
            if o.estimator:
                values[f"{o.name}_estimate"], values[f"{o.name}_measured"] = row[o.name], twin[o.name]
        rows.append({"candidate": cid, "source": source, **values})
    return pd.DataFrame(rows)


def _agreement(est: pd.Series, truth: pd.Series) -> str:
    from scipy.stats import spearmanr

    mae = float(np.mean(np.abs(est - truth)))
    rho = (
        spearmanr(est, truth).statistic
        if len(est) > 2 and est.nunique() > 1 and truth.nunique() > 1
        else None
    )
    return (
        f"MAE {mae:.4f}, Spearman "
        + ("n/a (too few points)" if rho is None else f"{rho:.3f}")
        + f", {len(est)} pairs"
    )


def section_irt(run: Run) -> tuple[str, list[Any]]:
    """Estimate against measured value, with MAE and Spearman; the held-out checks; items per candidate."""
    import plotly.graph_objects as go

    estimated = [o for o in run.objectives if o.estimator]
    parts, figures = [], []
    pairs = estimate_pairs(run)
    for o in estimated:
        if pairs.empty:
            parts.append(
                f"<p>{html.escape(o.name)}: no candidate measured on the whole search split yet "
                "(the front is re-scored when the search ends).</p>"
            )
            continue
        est, truth = pairs[f"{o.name}_estimate"], pairs[f"{o.name}_measured"]
        parts.append(f"<p>{html.escape(o.name)} ({html.escape(o.estimator)}): {_agreement(est, truth)}</p>")
        fig = go.Figure()
        for source, group in pairs.groupby(pairs.source.str.startswith("front")):
            fig.add_scatter(
                x=group[f"{o.name}_measured"],
                y=group[f"{o.name}_estimate"],
                mode="markers",
                name="front, re-scored" if source else "calibration models",
                marker={"size": 9},
                text=[f"candidate {c}: {s}" for c, s in zip(group.candidate, group.source, strict=True)],
                hovertemplate="%{text}<br>measured %{x:.4f}, estimated %{y:.4f}<extra></extra>",
            )
        lo = float(min(est.min(), truth.min())) - 0.02
        hi = float(max(est.max(), truth.max())) + 0.02
        fig.add_scatter(
            x=[lo, hi],
            y=[lo, hi],
            mode="lines",
            line={"dash": "dot", "color": "grey"},
            name="estimate = measured",
        )
        fig.update_layout(
            xaxis_title=f"{o.name} measured on the whole search split",
            yaxis_title=f"{o.name} estimated",
            height=380,
            margin={"t": 30},
        )
        figures.append(fig)
    checks = []
    for path in sorted((run.path / IRT).glob("*.adaptive.json")) if (run.path / IRT).is_dir() else []:
        check = json.loads(path.read_text())["check"]
        checks.append(
            (
                f"adaptive tests, scope {path.name.split('.')[0]}",
                f"on held-out calibration models (two folds): MAE {check['mae_mix']:.4f} with "
                f"{check['items']:.1f} items on average, against {check['mae_mean']:.4f} for the plain mean "
                "of the same items",
            )
        )
    if checks:
        parts.append(_table(checks))
    searched = run.candidates[run.candidates.kind == Kind.SEARCH]
    if len(searched):
        fig = go.Figure()
        reasons = searched.stopped.fillna("fixed items")
        for reason in sorted(reasons.unique()):
            fig.add_histogram(x=searched.n_items[reasons == reason], name=reason)
        fig.update_layout(
            barmode="stack",
            xaxis_title="items evaluated per search candidate",
            yaxis_title="candidates",
            height=300,
            margin={"t": 30},
            legend={"title": {"text": "test stopped"}},
        )
        mean = searched.n_items.mean()
        parts.append(f"<p>Items per search candidate: {mean:.1f} on average.</p>")
        figures.append(fig)
    return "".join(parts), figures


# --- tables --------------------------------------------------------------------------------------------


def section_tables(run: Run) -> str:
    """The test-split table (best, base, experts) once the run has finished, the front, and the failed
    candidates with their errors."""
    parts = []
    summary = _summary(run)
    if summary:
        label = summary.get("best_label")
        who = f"candidate {summary['best_candidate']}" + (f" ({label})" if label else "")
        parts.append(
            f"<h3>Test split</h3><p>best model: {html.escape(who)}, picked on "
            f"{html.escape(summary.get('best_picked_on', 'search values'))}</p>"
        )
        parts.append(_frame(summary_table(summary)))
    else:
        parts.append("<p>The test split is evaluated when the search ends.</p>")
    front = run.pareto_front()
    if len(front):
        measured = _measured(run)
        table = front[["generation"]].copy()
        for o in run.objectives:
            table[o.name] = front[o.name]
            if o.estimator:
                table[f"{o.name} measured"] = [
                    measured.at[k, o.name] if k in measured.index else np.nan for k in front.recipe_key
                ]
            table[f"test {o.name}"] = front[f"test_{o.name}"]
        table["recipe"] = [recipe_text(r) for r in front.recipe]
        parts.append("<h3>Pareto front</h3>" + _frame(table))
    failed = run.candidates[run.candidates.status == Status.FAILED]
    if len(failed):
        shown = failed.head(50)
        table = pd.DataFrame(
            {
                "kind": shown.kind,
                "generation": shown.generation,
                "worker": shown.worker,
                "error": [first_line(e) for e in shown.error],
                "whole error": [f"evomerge show {run.path} --candidate {i}" for i in shown.index],
            }
        )
        more = f" (the first 50 of {len(failed)})" if len(failed) > 50 else ""
        parts.append(f"<h3>Failed candidates{more}</h3>" + _frame(table))
    else:
        parts.append("<p>No candidate failed.</p>")
    return "".join(parts)


ANSWERS_SHOWN = 10  # items per generative task in the report's Answers section


def answers_candidate(run: Run) -> int | None:
    """Whose answers the report shows: the best model's on the test split once the run has finished,
    else the best search candidate's so far; None when the run has no generative task."""
    if not run.has_answers:
        return None
    summary = _summary(run)
    if summary:
        frame = run.candidates
        tested = frame[(frame.kind == Kind.TEST) & (frame.label == f"front:{summary['best_candidate']}")]
        if len(tested):
            return int(tested.index[0])
    if not len(_searched(run)):
        return None
    return run.best_id


def section_answers(run: Run) -> str | None:
    """What the best model wrote for the first items of each generative task, next to the targets."""
    cid = answers_candidate(run)
    if cid is None:
        return None
    table = run.answers(cid, limit=ANSWERS_SHOWN)
    if not len(table):
        return None
    row = run.candidates.loc[cid]
    return (
        f'<p class="note">Candidate {cid} ({html.escape(str(row.kind))}, {html.escape(str(row.split))} split): '
        f"the first {ANSWERS_SHOWN} items of each generative task; score: the item's value of the task's "
        f"metric. All of them: <code>run.answers({cid})</code> in a notebook, or "
        f"<code>evomerge show {html.escape(str(run.path))} --candidate {cid} --answers 1000</code>.</p>"
        + _frame(table.set_index(["task", "item"]))
    )
