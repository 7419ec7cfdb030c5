"""The run report: one self-contained HTML page of a run (``evomerge report``), which every run also
writes as ``RUN_DIR/report.html`` after each generation; and one page comparing runs
(``evomerge compare``).

A report only reads the run folder (the store in one read-only snapshot, summary.json and the held-out
checks in irt/ where they exist); the one file it may write there is report.html. Figures are plotly's,
with plotly.js inlined once in the page, so it opens without a network.
"""

from __future__ import annotations

import html
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evomerge.errors import EvomergeError
from evomerge.evaluations import first_line
from evomerge.report import duration, recipe_text, summary_table
from evomerge.run import Run
from evomerge.runfolder import IRT, REPORT, SUMMARY

_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
table.what td { text-align: left; } code { font-size: 0.9em; }
.status { font-weight: bold; } .note { color: #555; font-size: 0.9em; } nav a { margin-right: 1em; }
"""


# --- what the run is and where it stands ---------------------------------------------------------


def status_of(run: Run) -> str:
    """finished (summary.json is there), running (the process the run recorded is alive on this host),
    or stopped; a run recorded by another host is named with it."""
    if (run.path / SUMMARY).is_file():
        return "finished"
    running = run.meta.get("running")
    if not running:
        return "stopped"
    if running.get("host") != socket.gethostname():
        return f"running on {running.get('host')}, or stopped there"
    try:
        os.kill(int(running["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return "stopped"
    return "running"


def _summary(run: Run) -> dict[str, Any] | None:
    path = run.path / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def _config(run: Run) -> dict[str, Any]:
    return run.meta["config"]


def _search_split(run: Run) -> str:
    return _config(run)["fitness"]["search_split"]


def _searched(run: Run) -> pd.DataFrame:
    """Successful search candidates, with ``raced`` (an adaptive test stopped by racing: not rated)."""
    df = run.candidates
    ok = df[(df.kind == "search") & (df.status == "ok")].astype({"generation": int})
    return ok.assign(raced=ok.stopped == "raced")


def _measured(run: Run) -> pd.DataFrame:
    """Whole-search-split evaluations (the re-scored front, the calibration models), by recipe_key."""
    df = run.candidates
    full = df[df.kind.isin(["full", "calibration"]) & (df.split == _search_split(run)) & (df.status == "ok")]
    return full.reset_index().drop_duplicates("recipe_key").set_index("recipe_key")


def _table(rows: Sequence[tuple[str, Any]], cls: str = "what") -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _frame(df: pd.DataFrame) -> str:
    return df.to_html(float_format=lambda v: f"{v:.4f}", na_rep="", border=0, escape=True)


def _objective_text(o: Any) -> str:
    words = [f"{o.name} = {o.direction} {o.of}"]
    if o.estimator:
        items = "adaptive" if o.items == "adaptive" else f"{o.items} items"
        words.append(f"estimated by {o.estimator} from {items} ({o.selection})")
    return ", ".join(words)


def cost(run: Run) -> dict[str, float]:
    """Evaluations and what they cost so far: models and items, by why they were evaluated."""
    df = run.candidates
    search = df[df.kind == "search"]
    cal = df[df.kind == "calibration"]
    return {
        "candidates": len(search),
        "failed": int((search.status == "failed").sum()),
        "raced": int((search.stopped == "raced").sum()),
        "models": len(df),
        "items": int(df.n_items.sum()),
        "search_items": int(search.n_items.sum()),
        "tokens": int(df.n_tokens.sum()),
        "calibration": len(cal),
        "calibration_items": int(cal.n_items.sum()),
        "calibration_seconds": float(cal.wall_s.sum()),
    }


def wall_seconds(run: Run) -> float | None:
    summary = _summary(run)
    return summary["search_seconds"] if summary else run.meta.get("search_seconds")


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


# --- figures -----------------------------------------------------------------------------------------


def _hover(run: Run, searched: pd.DataFrame, measured: pd.DataFrame) -> list[str]:
    """Per search candidate: id, generation, values (estimated, measured, test) and recipe."""
    estimated = any(o.estimator for o in run.objectives)
    out = []
    for cid, row in searched.iterrows():
        lines = [f"<b>candidate {cid}</b>, generation {row.generation}"]
        twin = measured.loc[row.recipe_key] if row.recipe_key in measured.index else None
        for o in run.objectives:
            words = [f"{o.name}: {row[o.name]:.4f}" + (" estimated" if estimated and o.estimator else "")]
            if twin is not None and o.estimator:
                words.append(f"{twin[o.name]:.4f} measured")
            if np.isfinite(row[f"test_{o.name}"]):
                words.append(f"test {row[f'test_{o.name}']:.4f}")
            lines.append(", ".join(words))
        if row.raced:
            lines.append("stopped by racing (not rated)")
        lines += recipe_text(row.recipe).split("; ")
        out.append("<br>".join(lines))
    return out


def _generation_marker(searched: pd.DataFrame, **extra: Any) -> dict[str, Any]:
    return {
        "color": searched.generation,
        "colorscale": "Viridis",
        "colorbar": {"title": {"text": "generation"}},
        "symbol": np.where(searched.raced, "x", "circle"),
        "size": 8,
        "opacity": 0.8,
        **extra,
    }


_RING = {"size": 16, "color": "rgba(0,0,0,0)", "line": {"color": "crimson", "width": 2}}


def _axis(o: Any) -> str:
    return f"{o.name} ({o.direction})"


def _splom(frame: pd.DataFrame, objectives: Sequence[Any], text: list[str], name: str, marker: dict) -> Any:
    """Every pair of objectives of ``frame``'s rows, hovering ``text``."""
    import plotly.graph_objects as go

    dims = [{"label": _axis(o), "values": frame[o.name]} for o in objectives]
    hover = "%{text}<extra></extra>"
    return go.Splom(
        dimensions=dims, text=text, name=name, marker=marker, hovertemplate=hover, diagonal_visible=False
    )


def figure_front(run: Run) -> Any:
    """The objective space coloured by generation with the front ringed; one objective: its value per
    generation with the best so far; three or more: every pair (a scatter matrix)."""
    import plotly.graph_objects as go

    searched, front_ids = _searched(run), list(run.pareto_front().index)
    hover = _hover(run, searched, _measured(run))
    front = searched.loc[front_ids]
    front_hover = [hover[searched.index.get_loc(i)] for i in front_ids]
    objectives = run.objectives
    fig = go.Figure()
    common = {"hovertemplate": "%{text}<extra></extra>", "mode": "markers"}
    if len(objectives) == 1:
        o = objectives[0]
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(searched))
        fig.add_scatter(
            x=searched.generation + jitter,
            y=searched[o.name],
            text=hover,
            name="candidates",
            marker=_generation_marker(searched),
            **common,
        )
        progress = progress_table(run)
        fig.add_scatter(
            x=progress.index,
            y=progress[f"best_so_far_{o.name}"],
            mode="lines",
            line={"shape": "hv"},
            name="best so far",
        )
        fig.add_scatter(
            x=front.generation + jitter[[searched.index.get_loc(i) for i in front_ids]],
            y=front[o.name],
            text=front_hover,
            name="front (best)",
            marker=_RING,
            **common,
        )
        fig.update_layout(xaxis_title="generation", yaxis_title=_axis(o), xaxis_dtick=1)
    elif len(objectives) == 2:
        x, y = objectives
        fig.add_scatter(
            x=searched[x.name],
            y=searched[y.name],
            text=hover,
            name="candidates",
            marker=_generation_marker(searched),
            **common,
        )
        fig.add_scatter(
            x=front[x.name], y=front[y.name], text=front_hover, name="Pareto front", marker=_RING, **common
        )
        fig.update_layout(xaxis_title=_axis(x), yaxis_title=_axis(y))
    else:
        for frame, text, name, marker in (
            (searched, hover, "candidates", _generation_marker(searched)),
            (front, front_hover, "Pareto front", _RING),
        ):
            fig.add_trace(_splom(frame, objectives, text, name, marker))
        fig.update_layout(height=250 * len(objectives))
    fig.update_layout(legend={"orientation": "h", "y": -0.2}, margin={"t": 30})
    return fig


def progress_table(run: Run) -> pd.DataFrame:
    """Per generation: models and items evaluated so far (calibration first), and for each objective the
    generation's best and median (rated candidates) and the best so far."""
    df = run.candidates
    cal = df[df.kind == "calibration"]
    search = df[df.kind == "search"].astype({"generation": int})
    g = search.groupby("generation")
    out = pd.DataFrame({"evaluated": g.size(), "items": g.n_items.sum()})
    out["models_so_far"] = len(cal) + out.evaluated.cumsum()
    out["items_so_far"] = int(cal.n_items.sum()) + out["items"].cumsum()
    rated = _searched(run)
    rated = rated[~rated.raced].groupby("generation")
    for o in run.objectives:
        best = rated[o.name].agg(o.direction)
        out[f"best_{o.name}"] = best
        out[f"median_{o.name}"] = rated[o.name].median()
        so_far = getattr(out[f"best_{o.name}"], f"cum{o.direction}")().ffill()
        out[f"best_so_far_{o.name}"] = so_far
        # the candidate holding the best so far: the lowest id of the generation that first reached it
        before = so_far.shift()
        improved = before.isna() | (best > before if o.direction == "max" else best < before)
        ids = getattr(rated[o.name], f"idx{o.direction}")()
        out[f"best_id_so_far_{o.name}"] = (
            ids.reindex(out.index).where(improved & best.reindex(out.index).notna()).ffill()
        )
    return out


_X = (
    ("models_so_far", "models evaluated (calibration included)"),
    ("items_so_far", "items evaluated (calibration included)"),
)


def figure_progress(runs: Sequence[Run], names: Sequence[str] | None = None) -> Any:
    """Best so far and median per generation of each objective against models and items evaluated; one
    colour per run when there are several."""
    import plotly.colors
    from plotly.subplots import make_subplots

    objectives = runs[0].objectives
    fig = make_subplots(
        rows=len(objectives), cols=2, shared_yaxes=True, horizontal_spacing=0.04, vertical_spacing=0.12
    )
    palette = plotly.colors.qualitative.Plotly
    for k, run in enumerate(runs):
        table = progress_table(run)
        label = names[k] if names else None
        colour = palette[k % len(palette)]
        for i, o in enumerate(objectives, start=1):
            for j, (col, title) in enumerate(_X, start=1):
                first = i == 1 and j == 1
                x = table[col]
                for what, style in (("best_so_far", {"shape": "hv"}), ("median", {"dash": "dot"})):
                    fig.add_scatter(
                        x=x,
                        y=table[f"{what}_{o.name}"],
                        mode="lines+markers",
                        line={**style, "color": colour},
                        marker={"size": 5},
                        name=(f"{label}: " if label else "") + what.replace("_", " "),
                        legendgroup=f"{k}-{what}",
                        showlegend=first,
                        row=i,
                        col=j,
                        hovertemplate=f"{what.replace('_', ' ')} %{{y:.4f}} at {title.split(' (')[0]} %{{x:,}}"
                        + (f" ({label})" if label else "")
                        + "<extra></extra>",
                    )
                    if len(runs) == 1 and what == "best_so_far":
                        fig.add_scatter(
                            x=x,
                            y=table[f"best_{o.name}"],
                            mode="markers",
                            marker={"size": 7, "color": colour, "symbol": "diamond-open"},
                            name="generation's best",
                            legendgroup="gen-best",
                            showlegend=first,
                            row=i,
                            col=j,
                        )
                fig.update_xaxes(title_text=title if i == len(objectives) else None, row=i, col=j)
            fig.update_yaxes(title_text=_axis(o), row=i, col=1)
    fig.update_layout(
        height=300 * len(objectives) + 80, legend={"orientation": "h", "y": -0.25}, margin={"t": 30}
    )
    return fig


def _searched_params(run: Run) -> set[str] | None:
    """The parameter names the genome searches (None: not recorded, show every parameter)."""
    if not run.genes:
        return None
    return {g.rsplit("/", 1)[-1] for g in run.genes}


def _recipe_matrix(
    recipe: dict[str, Any], searched: set[str] | None, show_method: bool
) -> tuple[list[str], list[str], list[list[float | None]]]:
    """Rows (parameter, or parameter and expert), columns (layer groups) and values of a recipe."""
    cells: dict[str, dict[str, float]] = {}
    columns = []
    for g in recipe["groups"]:
        column = g["name"] + (f" ({g['method']})" if show_method else "")
        columns.append(column)
        values = dict(g["parameters"])
        values.update({f"lines.{k}": v for k, v in (g.get("lines") or {}).items()})
        for name, v in values.items():
            if searched is not None and name not in searched:
                continue
            items = v.items() if isinstance(v, dict) else [(None, v)]
            for expert, x in items:
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    continue
                cells.setdefault(name if expert is None else f"{name} · {expert}", {})[column] = float(x)
    rows = sorted(cells)
    return rows, columns, [[cells[r].get(c) for c in columns] for r in rows]


def figure_recipes(run: Run, limit: int = 8) -> Any | None:
    """A heatmap per candidate (the best model, then the front, at most ``limit`` in all): each searched
    parameter per layer group and expert, and the method per group where the method is a gene."""
    from plotly.subplots import make_subplots

    searched = _searched(run)
    if searched.empty:
        return None
    best = run.best_id
    ids = _front_ids(run, limit)
    params = _searched_params(run)
    show_method = len(_config(run)["search_space"]["methods"]) > 1
    mats = [_recipe_matrix(run.candidates.at[i, "recipe"], params, show_method) for i in ids]
    titles = []
    for i in ids:
        row = run.candidates.loc[i]
        who = f"candidate {i}" + (f" ({row.label})" if isinstance(row.label, str) else "")
        titles.append(("best model: " if i == best else "front: ") + who)
    heights = [max(len(m[0]), 1) for m in mats]
    fig = make_subplots(
        rows=len(ids), cols=1, subplot_titles=titles, row_heights=heights, vertical_spacing=0.25 / len(ids)
    )
    for k, (rows, columns, z) in enumerate(mats, start=1):
        text = [["" if v is None else f"{v:.2f}" for v in r] for r in z]
        fig.add_heatmap(
            x=columns,
            y=rows,
            z=z,
            text=text,
            texttemplate="%{text}",
            coloraxis="coloraxis",
            row=k,
            col=1,
            hovertemplate="%{y} in %{x}: %{z:.4f}<extra></extra>",
        )
    fig.update_layout(
        coloraxis={"colorscale": "Viridis", "colorbar": {"title": {"text": "value"}}},
        height=120 * len(ids) + 28 * sum(heights),
    )
    fig.update_yaxes(autorange="reversed")  # rows top to bottom in the order listed
    fig.update_layout(
        margin={"t": 40},
    )
    return fig


def _front_ids(run: Run, limit: int) -> list[int]:
    """The best model, then the rest of the front: at most ``limit`` candidate ids."""
    best = run.best_id
    return [best, *(i for i in run.pareto_front().index if i != best)][:limit]


def figure_flows(run: Run, limit: int = 8) -> Any | None:
    """For a run with a data flow, one panel per candidate (the best model, then the front): the model
    each step's layer comes from (rows) against the step (columns), labelled with the layer, coloured by
    the scale of the hidden state entering it. None for a run without a data flow."""
    from plotly.subplots import make_subplots

    if "depth" not in run.candidates or _searched(run).empty:
        return None
    ids = [i for i in _front_ids(run, limit) if run.candidates.at[i, "recipe"].get("flow")]
    if not ids:
        return None
    titles = [f"{'best model' if k == 0 else 'front'}: candidate {i}" for k, i in enumerate(ids)]
    fig = make_subplots(rows=len(ids), cols=1, subplot_titles=titles, vertical_spacing=0.4 / len(ids))
    for k, i in enumerate(ids, start=1):
        steps = run.candidates.at[i, "recipe"]["flow"]
        fig.add_scatter(
            x=list(range(len(steps))),
            y=[source for source, _, _ in steps],
            text=[str(layer) for _, layer, _ in steps],
            customdata=[scale for _, _, scale in steps],
            mode="markers+text",
            marker={
                "size": 18,
                "symbol": "square",
                "color": [s for _, _, s in steps],
                "coloraxis": "coloraxis",
            },
            textfont={"color": "black", "size": 10},
            hovertemplate="step %{x}: layer %{text} of %{y}, scale %{customdata:.3f}<extra></extra>",
            row=k,
            col=1,
        )
        fig.update_xaxes(dtick=1 if len(steps) <= 40 else None, row=k, col=1)
    fig.update_xaxes(title_text="step", row=len(ids), col=1)
    fig.update_layout(
        coloraxis={"colorscale": "RdBu", "cmid": 1.0, "colorbar": {"title": {"text": "scale"}}},
        height=110 + 190 * len(ids),
        showlegend=False,
        margin={"t": 40},
    )
    return fig


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
        source = "front, re-scored" if twin.kind == "full" else f"calibration model {twin.label}"
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
    searched = run.candidates[run.candidates.kind == "search"]
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
    failed = run.candidates[run.candidates.status == "failed"]
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
        tested = frame[(frame.kind == "test") & (frame.label == f"front:{summary['best_candidate']}")]
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


# --- pages ---------------------------------------------------------------------------------------------


def _page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str, list[Any]]]) -> str:
    """A page: sections of (anchor, heading, html, figures), with plotly.js inlined once."""
    from plotly.offline import get_plotlyjs

    nav = " ".join(f'<a href="#{a}">{html.escape(h)}</a>' for a, h, _, _ in sections)
    body = []
    for anchor, heading, text, figures in sections:
        divs = "".join(
            f.to_html(full_html=False, include_plotlyjs=False, config=_PLOTLY_CONFIG, div_id=f"{anchor}-{k}")
            for k, f in enumerate(figures)
        )
        body.append(f'<h2 id="{anchor}">{html.escape(heading)}</h2>{text}{divs}')
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="note">{html.escape(subtitle)}</p><nav>{nav}</nav>'
        + "".join(body)
        + "</body></html>"
    )


def build_report(run: Run, status: str | None = None) -> str:
    """The report of ``run`` as one HTML page."""
    status = status or status_of(run)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    sections = [("what-ran", "What ran", section_what_ran(run, status), [])]
    if len(_searched(run)):
        sections += [
            (
                "front",
                "Front",
                '<p class="note">Hover a point for its values and recipe.</p>',
                [figure_front(run)],
            ),
            ("progress", "Progress", "", [figure_progress([run])]),
        ]
        recipes = figure_recipes(run)
        if recipes is not None:
            sections.append(("recipes", "Recipes", "", [recipes]))
        flows = figure_flows(run)
        if flows is not None:
            note = '<p class="note">Each step: the layer taken there; colour: the scale entering it.</p>'
            sections.append(("flow", "Data flow", note, [flows]))
    else:
        sections.append(("front", "Front", "<p>No search candidate has finished yet.</p>", []))
    if any(o.estimator for o in run.objectives):
        text, figures = section_irt(run)
        sections.append(("irt", "IRT fitness", text, figures))
    answers = section_answers(run)
    if answers is not None:
        sections.append(("answers", "Answers", answers, []))
    sections.append(("tables", "Test split and failures", section_tables(run), []))
    return _page(
        f"evomerge run {run.path.name}", f"{run.path.resolve()}: {status}; written {stamp}", sections
    )


def _write(text: str, out: Path) -> Path:
    """Write ``out`` whole or not at all; a place that cannot be written is one line."""
    out = Path(out)
    if out.is_dir():
        raise EvomergeError(
            f"--out {str(out)!r} is a folder; give a file name such as {str(out / 'report.html')!r}"
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent if str(out.parent) else ".")
    except OSError as e:
        raise EvomergeError(f"--out {str(out)!r} cannot be written: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise EvomergeError(f"--out {str(out)!r} cannot be written: {e.strerror or e}") from None
    return out


def write_report(run: str | Path | Run, out: str | Path | None = None) -> Path:
    """Write the report of ``run`` (a Run or its folder) to ``out`` (default: RUN_DIR/report.html)."""
    run = run if isinstance(run, Run) else Run(run)
    return _write(build_report(run), Path(out) if out else run.path / REPORT)


def warn(error: Exception, console: Any = None) -> None:
    """The one line a run prints when its report cannot be written; the run goes on."""
    message = (
        f"warning: {REPORT} not written ({type(error).__name__}: {first_line(str(error))}); the run goes on"
    )
    if console is not None:
        console.print(message, markup=False, highlight=False)
    else:
        print(message, file=sys.stderr)


# --- comparison ----------------------------------------------------------------------------------------


def _names(paths: Sequence[Path]) -> list[str]:
    short = [p.name for p in paths]
    return short if len(set(short)) == len(short) else [str(p) for p in paths]


def check_comparable(runs: Sequence[Run], names: Sequence[str]) -> None:
    """Refuse runs whose objectives differ (name, what they measure or direction), naming them."""

    def spec(run: Run) -> dict[str, tuple[str, str]]:
        return {o.name: (o.of, o.direction) for o in run.objectives}

    first = spec(runs[0])
    for run, name in zip(runs[1:], names[1:], strict=True):
        other = spec(run)
        differ = sorted(set(first) ^ set(other)) + sorted(
            n for n in set(first) & set(other) if first[n] != other[n]
        )
        if differ:
            raise EvomergeError(
                f"runs {names[0]!r} and {name!r} have other objectives (differing: {', '.join(differ)}); "
                "compare runs of the same objectives"
            )


def figure_fronts(runs: Sequence[Run], names: Sequence[str]) -> Any:
    """Each run's front: one objective, every candidate's value per run with its best ringed; two, the
    candidates faint and the front as a line; three or more, a scatter matrix of the fronts."""
    import plotly.colors
    import plotly.graph_objects as go

    palette = plotly.colors.qualitative.Plotly
    objectives = runs[0].objectives
    fig = go.Figure()
    for k, (run, name) in enumerate(zip(runs, names, strict=True)):
        colour = palette[k % len(palette)]
        searched, front = _searched(run), run.pareto_front()
        hover = [
            f"<b>{name}</b>, candidate {i}, generation {g}"
            for i, g in zip(front.index, front.generation, strict=True)
        ]
        if len(objectives) == 1:
            o = objectives[0]
            fig.add_box(
                y=searched[o.name],
                name=name,
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker={"color": colour, "size": 5},
                line={"color": colour},
                fillcolor="rgba(0,0,0,0)",
            )
            fig.add_scatter(
                x=[name] * len(front),
                y=front[o.name],
                mode="markers",
                marker=_RING,
                text=hover,
                hovertemplate="%{text}<br>%{y:.4f}<extra></extra>",
                showlegend=False,
            )
            fig.update_layout(yaxis_title=_axis(o), showlegend=False)
        elif len(objectives) == 2:
            x, y = objectives
            fig.add_scatter(
                x=searched[x.name],
                y=searched[y.name],
                mode="markers",
                opacity=0.25,
                marker={"color": colour},
                name=f"{name}: candidates",
                legendgroup=name,
            )
            order = front.sort_values(x.name)
            fig.add_scatter(
                x=order[x.name],
                y=order[y.name],
                mode="lines+markers",
                marker={"color": colour, "size": 9},
                name=f"{name}: front",
                legendgroup=name,
                text=hover,
                hovertemplate="%{text}<br>%{x:.4f}, %{y:.4f}<extra></extra>",
            )
            fig.update_layout(xaxis_title=_axis(x), yaxis_title=_axis(y))
        else:
            fig.add_trace(_splom(front, objectives, hover, name, {"color": colour, "size": 8}))
            fig.update_layout(height=250 * len(objectives))
    fig.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.2})
    return fig


def build_compare(runs: Sequence[Run], names: Sequence[str]) -> str:
    rows = []
    for run, name in zip(runs, names, strict=True):
        cfg, c = _config(run), cost(run)
        summary = _summary(run)
        row: dict[str, Any] = {
            "run": name,
            "status": status_of(run),
            "algorithm": cfg["algorithm"]["name"],
            "estimator": ", ".join(sorted({o.estimator for o in run.objectives if o.estimator})) or "none",
            "models evaluated": c["models"],
            "items evaluated": c["items"],
            "search wall time": duration(wall_seconds(run)),
        }
        searched = _searched(run)
        for o in run.objectives:
            values = searched[~searched.raced][o.name]
            row[f"best {o.name} (search)"] = getattr(values, o.direction)() if len(values) else np.nan
            row[f"best model's test {o.name}"] = summary["best"].get(o.name) if summary else np.nan
        rows.append(row)
    table = _frame(pd.DataFrame(rows).set_index("run"))
    note = (
        '<p class="note">Search values of estimated objectives are estimates; the best model\'s test '
        "value is measured on the test split once a run has finished.</p>"
    )
    sections = [
        ("runs", "Runs", table + note, []),
        ("progress", "Progress", "", [figure_progress(runs, names)]),
        ("fronts", "Fronts", "", [figure_fronts(runs, names)]),
    ]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return _page(f"evomerge: {len(runs)} runs compared", f"written {stamp}", sections)


def write_compare(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write the comparison of the runs in ``run_dirs`` to ``out``."""
    paths = [Path(p) for p in run_dirs]
    if len(paths) < 2:
        raise EvomergeError(f"compare needs two run folders or more; got {len(paths)}")
    runs = [Run(p) for p in paths]
    names = _names(paths)
    check_comparable(runs, names)
    return _write(build_compare(runs, names), Path(out))
