"""Summaries, tables and progress display on the terminal (the objective arithmetic: evomerge.objectives)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evomerge.objectives import PICK_RULE
from evomerge.store import Candidate, Kind, Status


def recipe_summary(recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A recipe as people read it: per layer group, its method and parameters (per expert where the
    parameter is per expert) and its lines modifier's scales, values rounded to 4 decimals."""

    def rounded(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return round(v, 4) if isinstance(v, float) else v

    return {
        g["name"]: {
            "method": g["method"],
            **rounded(dict(g["parameters"])),
            **({"lines": rounded(dict(g["lines"]))} if g.get("lines") is not None else {}),
        }
        for g in recipe["groups"]
    }


def flow_text(recipe: dict[str, Any]) -> str | None:
    """A data flow as people read it: runs of consecutive layers of one model, each transition's scale
    after ``x`` (``merge 0-2 | a 1 x0.8 | b 2-3``); None for a recipe without one."""
    if recipe.get("flow") is None:
        return None
    runs: list[list[Any]] = []  # [source, first layer, last layer, scale]
    for source, layer, scale in recipe["flow"]:
        if runs and scale == 1.0 and runs[-1][0] == source and runs[-1][2] + 1 == layer:
            runs[-1][2] = layer
        else:
            runs.append([source, layer, layer, scale])
    return " | ".join(
        f"{s} {a}" + (f"-{b}" if b != a else "") + (f" x{x:.3g}" if x != 1.0 else "") for s, a, b, x in runs
    )


def recipe_text(recipe: dict[str, Any]) -> str:
    """One line: ``layers_0-1: task_arithmetic weight a=0.5 b=0.3; other: ...``."""
    parts = []
    for group, params in recipe_summary(recipe).items():
        words = [params["method"]]
        for name, v in params.items():
            if name == "method":
                continue
            if isinstance(v, dict):
                words.append(f"{name} " + " ".join(f"{e}={x:g}" for e, x in v.items()))
            else:
                words.append(f"{name}={v:g}" if isinstance(v, float) else f"{name}={v}")
        parts.append(f"{group}: " + " ".join(words))
    flow = flow_text(recipe)
    return "; ".join(parts + ([f"flow ({len(recipe['flow'])} layers): {flow}"] if flow else []))


def write_front_csv(
    folder: Any, front: Sequence[Candidate], test: dict[int, Candidate], objectives: Sequence[Any]
) -> None:
    """front.csv: candidate, generation, the search values, the test values in the same order, the
    depth (decoder layers) of a data-flow candidate, recipe."""
    rows = []
    names = [o.name for o in objectives]
    for c in front:
        row: dict[str, Any] = {"candidate": c.id, "generation": c.generation}
        row.update({f"search_{n}": c.objectives[n] for n in names})
        row.update({f"test_{n}": (test[c.id].objectives or {}).get(n) for n in names})
        if c.recipe.get("flow") is not None:
            row["depth"] = len(c.recipe["flow"])
        row["recipe"] = json.dumps(c.recipe, sort_keys=True)
        rows.append(row)
    folder.write_text("front.csv", pd.DataFrame(rows).to_csv(index=False))


def front_table(run_dir: Path) -> pd.DataFrame:
    """front.csv with the recipe written as one readable line."""
    df = pd.read_csv(Path(run_dir) / "front.csv")
    df["recipe"] = [recipe_text(json.loads(r)) for r in df["recipe"]]
    return df


def summary_table(summary: dict[str, Any]) -> pd.DataFrame:
    """Test-split objective values of the best merge, the base and each expert."""
    rows = {"best merge": summary["best"], "base": summary["base"]}
    rows.update({f"expert {k}": v for k, v in summary["experts"].items()})
    return pd.DataFrame(rows).T[summary["objectives"]]


def recipe_table(recipe: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """A summarised recipe as a table: one row per layer group, method and one column per parameter
    (and expert)."""
    rows = {}
    for group, params in recipe.items():
        row: dict[str, Any] = {}
        for name, v in params.items():
            if isinstance(v, dict):
                row.update({f"{name} {e}": x for e, x in v.items()})
            else:
                row[name] = v
        rows[group] = row
    return pd.DataFrame(rows).T


def print_summary(console: Any, summary: dict[str, Any]) -> None:
    print_frame(console, summary_table(summary), "test split")
    if "best_recipe" in summary:
        label = summary.get("best_label")
        who = f"candidate {summary['best_candidate']}" + (f" ({label})" if label else "")
        print_frame(console, recipe_table(summary["best_recipe"]), f"best model: {who}, recipe")
        if summary.get("best_flow"):
            console.print(f"best model's data flow: {summary['best_flow']}", highlight=False)
        console.print(
            f"best model picked on {summary.get('best_picked_on', 'search values')}: "
            f"{summary.get('best_picked_how', PICK_RULE)}",
            highlight=False,
        )
    est = summary.get("estimation")
    if est:
        rows = {
            name: {"MAE on the front (estimate vs full split)": e["mae_on_front"]}
            for name, e in est["errors"].items()
        }
        print_frame(console, pd.DataFrame(rows).T, "IRT fitness estimate")
        c = est["cost"]
        console.print(
            f"fitness cost per candidate: {c['items_per_candidate']:.0f} items vs {c['full_items_per_candidate']:.0f} "
            f"({c['item_reduction']:.1f}x fewer), {c['tokens_per_candidate']:.0f} forward tokens vs "
            f"{c['full_tokens_per_candidate']:.0f} ({c['token_reduction']:.1f}x fewer); calibration: "
            f"{c['calibration_subjects']} models on the full split, {c['calibration_seconds']:.0f} worker-seconds"
        )


def print_frame(console: Any, df: pd.DataFrame, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    for col in df.columns:
        table.add_column(str(col), justify="right")
    for index, row in zip(df.index, df.itertuples(index=False), strict=True):
        table.add_row(str(index), *(_cell(v) for v in row))
    console.print(table)


def _cell(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else (f"{int(v)}" if float(v).is_integer() and abs(v) > 1 else f"{v:.4f}")
    return str(v)


def progress_mode(console: Any) -> str | None:
    """How to show progress on ``console``: "bar" on a terminal, "lines" elsewhere (a file, a pipe, CI:
    a bar would print nothing until it ends), None without a console."""
    if console is None:
        return None
    return "bar" if console.is_terminal else "lines"


@contextmanager
def progress(console: Any, description: str, total: int) -> Iterator[Callable[[], None]]:
    """Progress on ``console``: a bar on a terminal, a line per tenth elsewhere; nothing when console is
    None. Yields the function that advances it."""
    mode = progress_mode(console)
    if mode is None or total == 0:
        yield lambda: None
        return
    if mode == "lines":
        import time

        start, done = time.monotonic(), 0
        step = max(1, total // 10)
        console.print(f"{description}: 0/{total}", highlight=False)

        def line() -> None:
            nonlocal done
            done += 1
            if done % step == 0 or done == total:
                console.print(
                    f"{description}: {done}/{total} ({time.monotonic() - start:.0f} s)", highlight=False
                )

        yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def duration(seconds: float | None) -> str:
    """Seconds as people read them: ``42 s``, ``3 min 5 s``, ``2 h 10 min``; ``-`` when unknown."""
    if seconds is None or not np.isfinite(seconds):
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s"


def generation_line(run: Any, generation: int, total: int, seconds_left: float | None) -> str:
    """One line after a generation: the best value so far of each objective (rated search candidates),
    the front's size, the items evaluated so far (calibration included) and the search's time left."""
    df = run.candidates
    rated = df[(df.kind == Kind.SEARCH) & (df.status == Status.OK) & (df.stopped != "raced")]
    best = ", ".join(
        f"{o.name} {getattr(rated[o.name], o.direction)():.4f}" if len(rated) else f"{o.name} -"
        for o in run.objectives
    )
    return (
        f"generation {generation}/{total}: best so far {best}; front {len(run.pareto_front())}; "
        f"{int(df.n_items.sum()):,} items evaluated; about {duration(seconds_left)} left in the search"
    )


def print_lines(console: Any, lines: list[str]) -> None:
    """Print lines as they are (no rich markup or highlighting): a memory plan, say."""
    for line in lines:
        console.print(line, markup=False, highlight=False)
