"""The same search on real SmolLM2-135M experts twice: full-split fitness vs IRT fitness on a 50x subset.

Reproduce (about an hour on 2 cores; builds the real zoo first if needed, see `evomerge zoo build --real`):

    python experiments/real_smollm2.py

Both runs use ``experiments/real_smollm2.yaml`` with the same seed, algorithm and budget. The first
scores every candidate on each objective's whole search split; the second on ``split / 50`` items per
objective, estimated with ``--estimator`` (item parameters calibrated on the base, the experts and
``--random-merges`` random merges, counted separately). Both fronts are re-evaluated on the whole test
split. Prints a table and writes it to ``experiments/real_smollm2.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from evomerge.config import load_config, parse_config
from evomerge.fitness.lmeval import LmEvalFitness
from evomerge.search import Search
from evomerge.store import Store

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(data: dict, out: Path) -> tuple[Path, float]:
    started = time.perf_counter()
    search = Search(parse_config({**data, "out": str(out)}))
    run_dir = search.resume() if (out / "store.sqlite").exists() else search.run()
    return run_dir, time.perf_counter() - started


def describe(run_dir: Path, wall: float, label: str) -> dict:
    store = Store(run_dir / "store.sqlite")
    summary = json.loads((run_dir / "summary.json").read_text())
    search = [c for c in store.candidates(kind="search") if c.status == "ok"]
    cal = store.candidates(kind="calibration")
    names = summary["objectives"]

    def mean_of(d: dict) -> float:
        return sum(d[n] for n in names) / len(names)

    fitness_s = sum(c.wall_s for c in search)
    cal_s = sum(c.wall_s for c in cal)
    best_expert = max(summary["experts"], key=lambda e: mean_of(summary["experts"][e]))
    return {
        "run": label,
        "candidates": len(search),
        "items / candidate": round(sum(c.n_items for c in search) / len(search), 1),
        "fitness s / candidate": round(fitness_s / len(search), 3),
        "fitness s / run": round(fitness_s, 1),
        "calibration s": round(cal_s, 1),
        "fitness + calibration s": round(fitness_s + cal_s, 1),
        "run wall s": round(wall, 1),
        "best merge test mean": round(mean_of(summary["best"]), 4),
        **{f"best merge test {n}": round(summary["best"][n], 4) for n in names},
        f"best expert ({best_expert}) test mean": round(mean_of(summary["experts"][best_expert]), 4),
        "base test mean": round(mean_of(summary["base"]), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=HERE / "real_smollm2.yaml")
    ap.add_argument("--estimator", default="gpirt")
    ap.add_argument("--selection", default="information")
    ap.add_argument("--reduction", type=int, default=50)
    ap.add_argument("--random-merges", type=int, default=10)
    ap.add_argument("--generations", type=int, help="override the config's algorithm.generations")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "real_smollm2")
    args = ap.parse_args()

    base = load_config(args.config).model_dump(mode="json")
    base.pop("out", None)
    if args.generations:
        base["algorithm"]["generations"] = args.generations
    sizes = LmEvalFitness(base["fitness"]["tasks"], include=base["fitness"]["include"]).n_items(
        base["fitness"]["search_split"]
    )

    full = json.loads(json.dumps(base))
    full["fitness"]["items"] = None
    irt_cfg = json.loads(json.dumps(base))
    irt_cfg["fitness"]["items"] = None
    irt_cfg["fitness"]["calibration"] = {"random_merges": args.random_merges, "model": "2pl"}
    for o in irt_cfg["objectives"]:
        n = sizes[o["of"]] if o["of"] != "mean" else sum(sizes.values())
        o.update(estimator=args.estimator, items=max(1, n // args.reduction), selection=args.selection)

    rows = []
    for label, data in (("full-split fitness", full), (f"IRT fitness ({args.estimator})", irt_cfg)):
        run_dir, wall = run(data, args.out / label.split()[0].lower())
        rows.append(describe(run_dir, wall, label))
    df = pd.DataFrame(rows).set_index("run").T
    full_s, irt_s = (rows[0]["fitness s / candidate"], rows[1]["fitness s / candidate"])
    saved = full_s - irt_s
    flags = f" --generations {args.generations}" if args.generations else ""
    lines = [
        f"Reproduce: `python experiments/real_smollm2.py --random-merges {args.random_merges}{flags}`",
        "",
        df.to_markdown(),
        "",
        f"IRT fitness per candidate: {full_s / irt_s:.1f}x less wall time than full-split fitness. "
        f"Calibration ({rows[1]['calibration s']:.0f} s) pays for itself after "
        f"{rows[1]['calibration s'] / saved:.0f} candidates.",
        f"Best merge, test mean: IRT run {rows[1]['best merge test mean']:.4f} vs full-fitness run "
        f"{rows[0]['best merge test mean']:.4f} "
        f"({100 * (rows[1]['best merge test mean'] - rows[0]['best merge test mean']):+.1f} points).",
    ]
    (HERE / "real_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
