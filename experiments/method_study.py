"""Method study (issue 18, part 5): on the tiny zoo, for the demo's budget, the best merge found by
searching task arithmetic alone, mergekit's methods, and the subspace catalogue (with and without the
lines modifier), with the same seeds and budget; the test-split mean accuracy of each run's best model.

    python experiments/method_study.py [--seeds 3] [--spaces task_arithmetic,subspace]
        [--out runs/method_study] [--quick] [--report]

Each run is ``experiments/demo.yaml`` (GA, pop 16 x 8 generations, mean accuracy on the whole search
split, 2 layer groups) with its ``search_space:`` replaced by one of ``SPACES``; only the space and the
seed differ between runs. Runs are kept in ``--out/<space>-<seed>`` and resumed or reused when the script
runs again (a folder made with another config is refused). A run scores its best model on the test
split when it finishes (``summary.json``: ``best``), which is the number reported, with the base's and
the experts' from the same file. ``--quick`` shrinks the budget to pop 4 x 1 generation and one seed, in
``runs/method_study-quick`` (a smoke run of the harness, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from evomerge.errors import EvomergeError
from evomerge.runfolder import RunFolder
from evomerge.searchspace import load_space_config

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars
OBJECTIVE = "mean_accuracy"  # the demo's objective
# each space: the search_space block that replaces the demo's (its other keys, layer_groups, are kept)
SPACES: dict[str, dict[str, Any]] = {
    # the demo's own: per-group task-arithmetic weights
    "task_arithmetic": {"name": "per_layer"},
    # mergekit's methods: task_arithmetic, ties or linear per group, weights and TIES densities
    "mergekit": {"name": "per_layer_methods"},
    # task_arithmetic, ties, tsv, iso_c or star per group, weights, densities, lambda and eta
    "subspace": {"name": "subspace"},
    # the same with LiNeS on top of whichever method a group draws (two more genes per group)
    "subspace_lines": {"name": "subspace", "lines": {"shallow": [0.0, 1.0], "deep": [0.5, 1.5]}},
}


def config(space: dict[str, Any], seed: int, out: Path, quick: bool) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "experiments" / "demo.yaml").read_text())
    data["search_space"] = {**data["search_space"], **space}
    if quick:
        data["algorithm"] = {**data["algorithm"], "pop_size": 4, "generations": 1}
    data.update(seed=seed, out=str(out))
    return data


def run_one(space: dict[str, Any], name: str, seed: int, root: Path, quick: bool) -> Path:
    """Run, resume or reuse one space and seed; a folder of another config is refused in one line."""
    from evomerge.config import parse_config
    from evomerge.search import Search, resume_search

    out = root / f"{name}-{seed}"
    cfg = parse_config(config(space, seed, out, quick))
    if not (out / "store.sqlite").exists():
        return Search(cfg).run()
    search = resume_search(out, cfg)  # refuses a folder made with another config
    return out if RunFolder(out).finished() else search.resume()


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def methods(space: dict[str, Any], done: list[dict[str, Any]]) -> dict[str, Any]:
    """The method study's column: the methods a space draws from."""
    names = ", ".join(load_space_config(space).methods) + (" + lines" if "lines" in space else "")
    return {"methods": names}


def table(runs: dict[str, list[Path]], spaces: dict[str, dict[str, Any]], describe=methods) -> pd.DataFrame:
    """Per space: ``describe``'s columns (of the space and its runs' summaries), the best model's test mean (median and min-max over seeds,
    and each seed's), the candidates evaluated and the search time (medians)."""
    rows = []
    for name, dirs in runs.items():
        done = [summary(d) for d in dirs]
        test = [s["best"][OBJECTIVE] for s in done]
        rows.append(
            {
                "space": name,
                **describe(spaces[name], done),
                "seeds": len(dirs),
                "best test mean": float(np.median(test)),
                "min-max": f"{min(test):.3f}-{max(test):.3f}",
                "per seed": " ".join(f"{t:.3f}" for t in test),
                "candidates": float(np.median([s["candidates_evaluated"] for s in done])),
                "search s": float(np.median([s["search_seconds"] for s in done])),
            }
        )
    return pd.DataFrame(rows)


def main(spaces: dict[str, dict[str, Any]] = SPACES, study: str = "method_study", describe=methods) -> None:
    """Run (or, ``--report``, read) every space of ``spaces`` for each seed, then print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--spaces", default="all", help=f"comma-separated, or all: {', '.join(spaces)}")
    ap.add_argument("--out", type=Path, default=None, help=f"default: runs/{study} (-quick)")
    ap.add_argument("--quick", action="store_true", help="pop 4 x 1 generation, one seed (a smoke run)")
    ap.add_argument("--report", action="store_true", help="table of the finished runs only, run nothing")
    args = ap.parse_args()
    out = args.out or ROOT / "runs" / (f"{study}-quick" if args.quick else study)
    seeds = 1 if args.quick else args.seeds
    names = list(spaces) if args.spaces == "all" else args.spaces.split(",")
    unknown = [n for n in names if n not in spaces]
    if unknown:
        sys.exit(f"error: unknown space {unknown[0]!r}; allowed: {', '.join(spaces)}")
    start = time.time()
    runs: dict[str, list[Path]] = {}
    for seed in range(seeds):  # seed by seed, so that a partial sweep covers every space
        for name in names:
            run_dir = out / f"{name}-{seed}"
            if args.report and not RunFolder(run_dir).finished():
                continue
            try:
                runs.setdefault(name, []).append(run_one(spaces[name], name, seed, out, args.quick))
            except EvomergeError as e:
                sys.exit(f"error: {e}")
    print(f"Command: `python {' '.join(sys.argv)}`\n")
    if not runs:
        print(f"no finished runs in {out}")
        return
    first = summary(next(iter(runs.values()))[0])
    experts = {e: v[OBJECTIVE] for e, v in first["experts"].items()}
    budget = "pop 4 x 1 generation (quick)" if args.quick else "the demo's GA, pop 16 x 8 generations"
    print(
        f"Tiny zoo, {budget}, mean accuracy on the whole search split; test-split mean accuracy of each "
        f"run's best model over {seeds} seed(s); {time.time() - start:.0f} s. On the test split the base "
        f"scores {first['base'][OBJECTIVE]:.3f}, the experts "
        + ", ".join(f"{e} {v:.3f}" for e, v in experts.items())
        + ".\n"
    )
    print(table(runs, spaces, describe).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
