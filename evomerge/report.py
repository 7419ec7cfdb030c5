"""Fronts, tables and progress display."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evomerge.store import Candidate


def _signed(c: Candidate, objectives: Sequence[Any]) -> np.ndarray:
    """Objective values as a minimisation problem."""
    return np.array(
        [-c.objectives[o.name] if o.direction == "max" else c.objectives[o.name] for o in objectives]
    )


def pareto_front(candidates: Sequence[Candidate], objectives: Sequence[Any]) -> list[Candidate]:
    """Non-dominated candidates (distinct recipes), best first for one objective."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    unique = list({c.recipe_key: c for c in candidates}.values())
    F = np.stack([_signed(c, objectives) for c in unique])
    if len(objectives) == 1:
        best = F[:, 0].min()
        return [unique[i] for i in np.flatnonzero(F[:, 0] == best)]
    front = NonDominatedSorting().do(F, only_non_dominated_front=True)
    return sorted((unique[i] for i in front), key=lambda c: tuple(_signed(c, objectives)))


def pick_best(
    front: Sequence[Candidate], objectives: Sequence[Any], measured: dict[int, Candidate] | None = None
) -> Candidate:
    """The candidate with the best mean of its (signed) objective values; earliest on ties.
    ``measured`` (candidate id -> its evaluation on the whole search split) ranks by those values
    instead of the candidates' own, e.g. when the search's values are IRT estimates."""

    def score(c: Candidate) -> tuple[float, int]:
        return float(_signed(measured[c.id] if measured else c, objectives).mean()), c.id

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


def write_front_csv(path: Path, front: Sequence[Candidate], test: dict[int, Candidate]) -> None:
    rows = []
    for c in front:
        row: dict[str, Any] = {"candidate": c.id, "generation": c.generation}
        row.update({f"search_{k}": v for k, v in c.objectives.items()})
        row.update({f"test_{k}": v for k, v in (test[c.id].objectives or {}).items()})
        row["recipe"] = json.dumps(c.recipe, sort_keys=True)
        rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)


def front_table(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "front.csv").drop(columns=["recipe"])


def summary_table(summary: dict[str, Any]) -> pd.DataFrame:
    """Test-split objective values of the best merge, the base and each expert."""
    rows = {"best merge": summary["best"], "base": summary["base"]}
    rows.update({f"expert {k}": v for k, v in summary["experts"].items()})
    return pd.DataFrame(rows).T[summary["objectives"]]


def print_summary(console: Any, summary: dict[str, Any]) -> None:
    print_frame(console, summary_table(summary), "test split")
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


@contextmanager
def progress(console: Any, description: str, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar on ``console`` (none when console is None); yields the function that advances it."""
    if console is None or total == 0:
        yield lambda: None
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
