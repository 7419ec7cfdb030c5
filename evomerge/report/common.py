"""What the HTML pages share: the run's status and cost as a page states them, the read-only views of
its candidates the sections use, small HTML helpers, and the page frame (plotly.js inlined once) with
its whole-or-nothing write."""

from __future__ import annotations

import html
import json
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from evomerge.errors import EvomergeError
from evomerge.run import Run
from evomerge.runfolder import SUMMARY
from evomerge.store import Kind, Status

# One section of a page: (anchor, heading, html, figures).
Section = tuple[str, str, str, list[Any]]

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
    ok = df[(df.kind == Kind.SEARCH) & (df.status == Status.OK)].astype({"generation": int})
    return ok.assign(raced=ok.stopped == "raced")


def _measured(run: Run) -> pd.DataFrame:
    """Whole-search-split evaluations (the re-scored front, the calibration models), by recipe_key."""
    df = run.candidates
    full = df[
        df.kind.isin([Kind.FULL.value, Kind.CALIBRATION.value])
        & (df.split == _search_split(run))
        & (df.status == Status.OK)
    ]
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
    search = df[df.kind == Kind.SEARCH]
    cal = df[df.kind == Kind.CALIBRATION]
    return {
        "candidates": len(search),
        "failed": int((search.status == Status.FAILED).sum()),
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


def _page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
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
