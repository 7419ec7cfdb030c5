"""The run page (``evomerge report``, RUN_DIR/report.html): its sections in order (``SECTIONS``), the page
built from them, written whole, and the refresh a run is handed to rewrite it after each generation."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.evaluations import first_line
from evomerge.report.common import Section, _page, _searched, _write, status_of
from evomerge.report.figures import figure_flows, figure_front, figure_progress, figure_recipes
from evomerge.report.sections import section_answers, section_irt, section_tables, section_what_ran
from evomerge.report.terminal import generation_line
from evomerge.run import Run
from evomerge.runfolder import REPORT
from evomerge.session import Refresh, RunState


def _what_ran(run: Run, status: str) -> list[Section]:
    return [("what-ran", "What ran", section_what_ran(run, status), [])]


def _search(run: Run, status: str) -> list[Section]:
    """The front, progress, recipes and data flows; a line until a search candidate has finished."""
    if not len(_searched(run)):
        return [("front", "Front", "<p>No search candidate has finished yet.</p>", [])]
    out: list[Section] = [
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
        out.append(("recipes", "Recipes", "", [recipes]))
    flows = figure_flows(run)
    if flows is not None:
        note = '<p class="note">Each step: the layer taken there; colour: the scale entering it.</p>'
        out.append(("flow", "Data flow", note, [flows]))
    return out


def _irt(run: Run, status: str) -> list[Section]:
    if not any(o.estimator for o in run.objectives):
        return []
    text, figures = section_irt(run)
    return [("irt", "IRT fitness", text, figures)]


def _answers(run: Run, status: str) -> list[Section]:
    answers = section_answers(run)
    return [] if answers is None else [("answers", "Answers", answers, [])]


def _tables(run: Run, status: str) -> list[Section]:
    return [("tables", "Test split and failures", section_tables(run), [])]


# The run page's sections in order: each gives its (anchor, heading, html, figures), or none.
SECTIONS: list[Callable[[Run, str], list[Section]]] = [_what_ran, _search, _irt, _answers, _tables]


def build_report(run: Run, status: str | None = None) -> str:
    """The report of ``run`` as one HTML page."""
    status = status or status_of(run)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    sections = [s for make in SECTIONS for s in make(run, status)]
    return _page(
        f"evomerge run {run.path.name}", f"{run.path.resolve()}: {status}; written {stamp}", sections
    )


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


def refresher(console: Any = None) -> Refresh:
    """The refresh a run is handed (``Search(refresh=...)``): rewrite RUN_DIR/report.html from the store
    and, after a generation, print its line on ``console`` (best so far, front, items, time left). A
    report that cannot be written is a warning line, never a stop."""

    def refresh(state: RunState) -> None:
        try:
            run = Run(state.run_dir, state.read())
            if state.generation is not None and console is not None:
                line = generation_line(run, state.generation, state.generations, state.seconds_left)
                console.print(line, markup=False, highlight=False)
            write_report(run)
        except Exception as e:  # the run matters more than its report
            warn(e, console)

    return refresh
