"""What rewriting RUN_DIR/report.html after each generation costs, against the generation itself.

    python experiments/benchmarks/report_cost.py [RUN_DIR ...] [--repeat 3]

For each finished run folder (default: the first seed of every recipe in runs/efficiency and
runs/efficiency-real, and of every space in runs/method_study and runs/flow_study, where they exist),
the time a run spends per report (what ``Search.refresh_report`` does: read the store's snapshot into a
``Run`` and write the page; best of ``--repeat``, in this process, which has imported plotly once),
the page's size, and the run's own search seconds per generation (its summary's ``search_seconds``
over its generations), so the last column is the share of a generation the report adds. The report is
written to a temporary file; the run folders are only read.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from evomerge.report import page
from evomerge.run import Run
from evomerge.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ["runs/efficiency", "runs/efficiency-real", "runs/method_study", "runs/flow_study"]


def default_runs() -> list[Path]:
    runs = []
    for folder in DEFAULT:
        for run in sorted((ROOT / folder).glob("*-0")):
            if RunFolder(run).finished():
                runs.append(run)
    return runs


def measure(run_dir: Path, repeat: int, out: Path) -> dict:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run = Run(run_dir)
        page.write_report(run, out)
        times.append(time.perf_counter() - start)
    summary = json.loads((run_dir / "summary.json").read_text())
    generations = int(run.candidates.generation.max())
    per_generation = summary["search_seconds"] / generations
    report_s = min(times)
    return {
        "run": f"{run_dir.parent.name}/{run_dir.name}",
        "candidates": len(run.candidates),
        "generations": generations,
        "report s": report_s,
        "page MiB": out.stat().st_size / 2**20,
        "search s / generation": per_generation,
        "report / generation": f"{100 * report_s / per_generation:.1f}%",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    runs = args.runs or default_runs()
    if not runs:
        sys.exit("error: no finished run folders given or found under " + ", ".join(DEFAULT))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(r, args.repeat, Path(tmp) / "report.html") for r in runs]
    print(f"Command: `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')})\n")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
