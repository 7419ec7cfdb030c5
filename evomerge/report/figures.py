"""The pages' plotly figures: the front, progress per generation, recipes as heatmaps and data
flows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from evomerge.report.common import _config, _measured, _searched
from evomerge.report.terminal import recipe_text
from evomerge.run import Run
from evomerge.store import Kind

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
    cal = df[df.kind == Kind.CALIBRATION]
    search = df[df.kind == Kind.SEARCH].astype({"generation": int})
    g = search.groupby("generation")
    out = pd.DataFrame({"evaluated": g.size(), "items": g.n_items.sum()})
    out["models_so_far"] = len(cal) + out.evaluated.cumsum()
    out["items_so_far"] = int(cal.n_items.sum()) + out["items"].cumsum()
    rated = _searched(run)
    rated = rated[~rated.raced].groupby("generation")
    for o in run.objectives:
        best = rated[o.name].agg(o.direction).reindex(out.index)  # NaN: a generation raced whole
        out[f"best_{o.name}"] = best
        out[f"median_{o.name}"] = rated[o.name].median()
        so_far = getattr(out[f"best_{o.name}"], f"cum{o.direction}")().ffill()
        out[f"best_so_far_{o.name}"] = so_far
        # the candidate holding the best so far: the lowest id of the generation that first reached it
        before = so_far.shift()
        improved = before.isna() | (best > before if o.direction == "max" else best < before)
        ids = getattr(rated[o.name], f"idx{o.direction}")()
        out[f"best_id_so_far_{o.name}"] = ids.reindex(out.index).where(improved & best.notna()).ffill()
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
