"""The page comparing runs (``evomerge compare``): a table of the runs, their progress and their
fronts on one page."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evomerge.errors import EvomergeError
from evomerge.report.common import (
    _config,
    _frame,
    _page,
    _searched,
    _summary,
    _write,
    cost,
    status_of,
    wall_seconds,
)
from evomerge.report.figures import _RING, _axis, _splom, figure_progress
from evomerge.report.terminal import duration
from evomerge.run import Run

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
