"""The same search on real SmolLM2-135M experts twice: full-split fitness vs IRT fitness on a 50x subset.

Reproduce (about 70 minutes on 2 cores; builds the real zoo first if needed, see
`evomerge zoo build --real`):

    python experiments/real_smollm2.py

All runs use ``experiments/real_smollm2.yaml`` with the same seed, algorithm and budget. The first
scores every candidate on each objective's whole search split; then one run per ``--estimator`` scores
it on ``split / 50`` items per objective (item parameters calibrated on the base, the experts and
``--random-merges`` random merges, counted separately). Every front is re-evaluated on the whole test
split. The table names each run's best model (a merge, or an input the search found nothing better
than) and, separately, the best merge among the searched candidates. Finished runs are read back
from their folders under ``--out``, not rerun. Prints a table and writes it to
``experiments/real_smollm2.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pandas as pd

from evomerge.config import load_config, parse_config
from evomerge.fitness.lmeval import LmEvalFitness
from evomerge.jobs import Job
from evomerge.recipe import Recipe
from evomerge.search import Search, resume_search
from evomerge.store import Store
from evomerge.workers import Worker

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(data: dict, out: Path) -> Path:
    config = parse_config({**data, "out": str(out)})
    if (out / "store.sqlite").exists():  # finished or stopped: go on with the models it started with
        return resume_search(out, config).resume()
    return Search(config).run()


def describe(run_dir: Path, label: str) -> dict:
    """One column of the table, read from the run's store (so a finished run resumed gives the same)."""
    store = Store(run_dir / "store.sqlite")
    summary = json.loads((run_dir / "summary.json").read_text())
    search = [c for c in store.candidates(kind="search") if c.status == "ok"]
    cal = store.candidates(kind="calibration")
    names = summary["objectives"]

    def mean_of(d: dict) -> float:
        return sum(d[n] for n in names) / len(names)

    searched = {gene.split("/")[0] for gene in store.get_meta("genes")}  # groups with genes

    def is_input(recipe: dict) -> bool:  # weight 1 on one expert, 0 on the others, in every searched group
        weights = [g["parameters"].get("weight", {}) for g in recipe["groups"] if g["name"] in searched]
        return any(all(w == {x: float(x == e) for x in w} for w in weights) for e in summary["experts"])

    # the best front member that is a merge, not an input, on values measured on the whole search split
    measured = {f["candidate"]: {n: f["search"][n] for n in names} for f in summary["front"]}
    for n, e in summary.get("estimation", {}).get("errors", {}).items():
        for f in e["front"]:
            measured[f["candidate"]][n] = f["full"]
    merges = [f for f in summary["front"] if not is_input(store.get(f["candidate"]).recipe)]
    best_merge = max(merges, key=lambda f: (mean_of(measured[f["candidate"]]), -f["candidate"]))
    best = store.get(summary["best_candidate"])
    what = f"{'expert' if is_input(best.recipe) else 'merge'} #{best.id}"
    what += (
        f" ({best.label}, calibration)" if best.kind == "calibration" else f" (generation {best.generation})"
    )

    fitness_s = sum(c.wall_s for c in search)
    cal_s = sum(c.wall_s for c in cal)
    reeval_s = sum(c.wall_s for c in store.candidates() if c.kind in ("test", "full", "reference"))
    best_expert = max(summary["experts"], key=lambda e: mean_of(summary["experts"][e]))
    return {
        "run": label,
        "candidates": len(search),
        "items / candidate": round(sum(c.n_items for c in search) / len(search), 1),
        "fitness s / candidate": round(fitness_s / len(search), 3),
        "fitness s / run": round(fitness_s, 1),
        "calibration s": round(cal_s, 1),
        "fitness + calibration s": round(fitness_s + cal_s, 1),
        "front + reference re-evaluation s": round(reeval_s, 1),
        "best model": what,
        "best model test mean": round(mean_of(summary["best"]), 4),
        **{f"best model test {n}": round(summary["best"][n], 4) for n in names},
        "best searched merge (not an input) test mean": round(mean_of(best_merge["test"]), 4),
        f"best expert ({best_expert}) test mean": round(mean_of(summary["experts"][best_expert]), 4),
        "base test mean": round(mean_of(summary["base"]), 4),
    }


def side_by_side(run_dir: Path, n: int) -> dict:
    """Per-candidate fitness wall time, full split vs subset, measured in one worker process: the first
    ``n`` search candidates of an IRT run evaluated alternately on the whole search split and on their
    own item subsets (the runs above ran at different times on a shared machine; this ratio does not
    depend on that)."""
    search = resume_search(run_dir)  # the model folders the run used
    worker = Worker(search._models_spec(), search._fitness_spec(), search.config.threads_per_worker)
    cands = [c for c in Store(run_dir / "store.sqlite").candidates(kind="search") if c.status == "ok"][
        : n + 1
    ]
    full_s, subset_s = [], []
    for i, c in enumerate(cands):
        items = {t: [int(k) for k in r] for t, r in c.responses.items()}
        for split_items, times in ((None, full_s), (items, subset_s)):
            started = time.perf_counter()
            result = worker.evaluate(Job(c.id, Recipe.from_dict(c.recipe), c.split, split_items))
            assert result.ok, result.error
            if i:  # the first candidate warms the worker up
                times.append(time.perf_counter() - started)
    full, subset = statistics.median(full_s), statistics.median(subset_s)
    return {
        "candidates": n,
        "full s": round(full, 3),
        "subset s": round(subset, 3),
        "ratio": round(full / subset, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=HERE / "real_smollm2.yaml")
    ap.add_argument(
        "--estimator",
        nargs="+",
        default=["sgpirt"],
        help="one IRT run per estimator (default: %(default)s)",
    )
    ap.add_argument("--selection", default="information")
    ap.add_argument("--reduction", type=int, default=50)
    ap.add_argument("--random-merges", type=int, default=10)
    ap.add_argument("--generations", type=int, help="override the config's algorithm.generations")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "real_smollm2")
    ap.add_argument("--side-by-side", type=int, default=4, help="candidates timed in one process (0: skip)")
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

    def irt_config(estimator: str) -> dict:
        cfg = json.loads(json.dumps(base))
        cfg["fitness"]["items"] = None
        cfg["fitness"]["calibration"] = {"random_merges": args.random_merges, "model": "2pl"}
        for o in cfg["objectives"]:
            n = sizes[o["of"]] if o["of"] != "mean" else sum(sizes.values())
            o.update(estimator=estimator, items=max(1, n // args.reduction), selection=args.selection)
        return cfg

    rows = [describe(run(full, args.out / "full-split"), "full-split fitness")]
    for est in args.estimator:
        rows.append(describe(run(irt_config(est), args.out / f"irt-{est}"), f"IRT fitness ({est})"))
    df = pd.DataFrame(rows).set_index("run").T
    flags = f" --generations {args.generations}" if args.generations else ""
    lines = [
        f"Reproduce: `python experiments/real_smollm2.py --random-merges {args.random_merges}"
        f" --estimator {' '.join(args.estimator)}{flags}`",
        "",
        df.to_markdown(),
        "",
    ]
    full_row = rows[0]
    for row in rows[1:]:
        saved = full_row["fitness s / candidate"] - row["fitness s / candidate"]
        gap = 100 * (row["best model test mean"] - full_row["best model test mean"])
        key = "best searched merge (not an input) test mean"
        merge_gap = 100 * (row[key] - full_row[key])
        lines.append(
            f"- {row['run']}: {full_row['fitness s / candidate'] / row['fitness s / candidate']:.1f}x less "
            f"fitness wall time per candidate than full-split fitness; calibration ({row['calibration s']:.0f} s) "
            f"pays for itself after {row['calibration s'] / saved:.0f} candidates; best model test mean "
            f"{row['best model test mean']:.4f} vs {full_row['best model test mean']:.4f} ({gap:+.1f} points); "
            f"best searched merge {row[key]:.4f} vs {full_row[key]:.4f} ({merge_gap:+.1f} points)."
        )
    if args.side_by_side:
        t = side_by_side(args.out / f"irt-{args.estimator[0]}", args.side_by_side)
        lines.append(
            f"- In one worker process, alternately (median of {t['candidates']} candidates of the "
            f"{args.estimator[0]} run): whole search split {t['full s']:.2f} s, item subset "
            f"{t['subset s']:.2f} s per candidate: {t['ratio']:.1f}x."
        )
    (HERE / "real_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
