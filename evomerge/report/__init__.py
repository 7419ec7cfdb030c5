"""What a run shows people, by role: :mod:`~evomerge.report.terminal` (summaries, tables and progress
on the terminal, re-exported here), :mod:`~evomerge.report.page` (the run's HTML page, its section list
and the refresh a run is handed), :mod:`~evomerge.report.sections` and :mod:`~evomerge.report.figures`
(what the page shows), :mod:`~evomerge.report.compare` (the page comparing runs) and
:mod:`~evomerge.report.common` (what the pages share). Importing it loads no torch and no merge kernel."""

from __future__ import annotations

from evomerge.report.terminal import (
    duration,
    flow_text,
    front_table,
    generation_line,
    print_frame,
    print_lines,
    print_summary,
    progress,
    progress_mode,
    recipe_summary,
    recipe_table,
    recipe_text,
    summary_table,
    write_front_csv,
)

__all__ = [
    "duration",
    "flow_text",
    "front_table",
    "generation_line",
    "print_frame",
    "print_lines",
    "print_summary",
    "progress",
    "progress_mode",
    "recipe_summary",
    "recipe_table",
    "recipe_text",
    "summary_table",
    "write_front_csv",
]
