"""Search efficiency on the tiny zoo: the peers' recipes and evomerge's, as evomerge configurations of
the demo's search space, side by side over seeds: the best candidate's test accuracy against model
evaluations and against item evaluations (calibration included), and the item evaluations each needs
to reach the final test accuracy of the GA with full-split fitness.

    python experiments/benchmarks/search_efficiency.py [--seeds 5] [--recipes ga_full,bo_adaptive]
        [--out runs/efficiency] [--quick]

Runs are kept in ``--out/<recipe>-<seed>`` and resumed or reused when the script runs again. ``--quick``
shrinks every budget 4x (a smoke run of the harness, not a measurement).
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

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars, for the test-split scoring here
TASKS = ["zoo_addition", "zoo_script", "zoo_reversal"]


def recipes(quick: bool) -> dict[str, dict[str, Any]]:
    """Each recipe's config changes to the demo: algorithm, budget, fitness items, objective."""
    shrink = 4 if quick else 1
    pop, gens = 16 // shrink, 8 // shrink
    plain = {"name": "mean_accuracy", "of": "mean"}

    def irt(**o: Any) -> dict[str, Any]:
        return {**plain, **o}

    ga = {"name": "ga", "pop_size": pop, "generations": gens}
    cma = {"name": "cmaes", "pop_size": pop, "generations": gens}
    bo = {"name": "bo", "pop_size": 2, "generations": 32 // shrink}
    return {
        # the demo's budget: 128 candidates on the whole search split
        "ga_full": {"algorithm": ga, "items": None, "objective": plain},
        # Mergenetic (MERGE^3): GA + gmpirt on 20 random items (its gp weight is chosen from calibration
        # data here, not fixed at 0.5)
        "mergenetic": {"algorithm": ga, "objective": irt(estimator="gmpirt", items=20, selection="random")},
        # mergekit-evolve: CMA-ES on a fixed subset of the split (a random one: evomerge has no "first N")
        "mergekit_evolve": {"algorithm": cma, "items": 100, "objective": plain},
        # Sakana's evolutionary merge: CMA-ES on the whole split
        "sakana": {"algorithm": cma, "items": None, "objective": plain},
        # evomerge before this wave: GA + sgpirt on 12 information-selected items
        "ga_sgpirt": {
            "algorithm": ga,
            "objective": irt(estimator="sgpirt", items=12, selection="information"),
        },
        "bo_full": {"algorithm": bo, "items": None, "objective": plain},
        "bo_sgpirt": {
            "algorithm": bo,
            "objective": irt(estimator="sgpirt", items=12, selection="information"),
        },
        "bo_adaptive": {
            "algorithm": bo,
            "objective": irt(estimator="sgpirt", items="adaptive", max_items=40, target_se=0.05, race=True),
        },
    }


def config(recipe: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "experiments" / "demo.yaml").read_text())
    data["fitness"].pop("items", None)
    if recipe.get("items"):
        data["fitness"]["items"] = recipe["items"]
    if "estimator" in recipe["objective"]:
        data["fitness"]["calibration"] = {"random_merges": 20}
    data.update(objectives=[recipe["objective"]], algorithm=recipe["algorithm"], seed=seed, out=str(out))
    return data


def run_one(name: str, recipe: dict[str, Any], seed: int, root: Path) -> Path:
    from evomerge.config import parse_config
    from evomerge.runfolder import RunFolder
    from evomerge.search import Search, resume_search

    out = root / f"{name}-{seed}"
    if RunFolder(out).finished():
        return out
    if (out / "store.sqlite").exists():
        return resume_search(out).resume()
    return Search(parse_config(config(recipe, seed, out))).run()


def test_accuracy(run_dir: Path, ids: list[int], cache: dict[int, float]) -> dict[int, float]:
    """The test-split mean accuracy of candidates ``ids`` (re-merged in this process, scored by lm-eval),
    cached in ``run_dir/efficiency_test.json``."""
    import torch

    from evomerge.fitness.lmeval import LmEvalFitness
    from evomerge.run import load_run

    path = run_dir / "efficiency_test.json"
    cache.update({int(k): v for k, v in (json.loads(path.read_text()) if path.is_file() else {}).items()})
    todo = [i for i in ids if i not in cache]
    if todo:
        run = load_run(run_dir)
        fitness = LmEvalFitness(TASKS)
        for i in todo:
            model, tok = run.load_model(i)
            with torch.no_grad():
                cache[i] = float(fitness.evaluate(model, tok, "test").values["mean"])
        path.write_text(json.dumps(cache))
    return cache


def anytime(run_dir: Path) -> pd.DataFrame:
    """Per generation: model and item evaluations so far (calibration included), the best candidate by
    its search value so far, and that candidate's test accuracy."""
    from evomerge.store import Store

    store = Store(run_dir / "store.sqlite", readonly=True)
    rows = store.candidates()
    store.close()
    calibration = [c for c in rows if c.kind == "calibration"]
    searched = [c for c in rows if c.kind == "search"]
    best_id, best, points = None, -np.inf, []
    items = sum(c.n_items for c in calibration)
    models = len(calibration)
    for g in sorted({c.generation for c in searched}):
        gen = [c for c in searched if c.generation == g]
        items += sum(c.n_items for c in gen)
        models += len(gen)
        for c in gen:
            if c.status == "ok" and c.stopped != "raced" and c.objectives["mean_accuracy"] > best:
                best, best_id = c.objectives["mean_accuracy"], c.id
        points.append({"generation": g, "models": models, "items": items, "best_id": best_id})
    df = pd.DataFrame(points)
    tests = test_accuracy(run_dir, sorted({int(i) for i in df.best_id.dropna()}), {})
    df["test"] = df.best_id.map(lambda i: tests.get(int(i), np.nan) if i == i else np.nan)
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--recipes", default="all", help="comma-separated names, or all")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "efficiency")
    ap.add_argument("--quick", action="store_true", help="every budget 4x smaller (a smoke run)")
    args = ap.parse_args()
    catalogue = recipes(args.quick)
    names = list(catalogue) if args.recipes == "all" else args.recipes.split(",")
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        sys.exit(f"error: unknown recipe {unknown[0]!r}; allowed: {', '.join(catalogue)}")
    start = time.time()
    curves: dict[str, list[pd.DataFrame]] = {}
    for name in names:
        for seed in range(args.seeds):
            curves.setdefault(name, []).append(anytime(run_one(name, catalogue[name], seed, args.out)))
    target_runs = curves.get("ga_full")
    target = float(np.median([c.test.iloc[-1] for c in target_runs])) if target_runs else np.nan
    table = []
    for name, runs in curves.items():
        reach = [c[c.test >= target] for c in runs]
        table.append(
            {
                "recipe": name,
                "final test (median)": np.median([c.test.iloc[-1] for c in runs]),
                "models": np.median([c.models.iloc[-1] for c in runs]),
                "item evaluations": np.median([c["items"].iloc[-1] for c in runs]),
                "items to GA-full's final test": np.median(
                    [r["items"].iloc[0] if len(r) else np.inf for r in reach]
                ),
                "models to it": np.median([r.models.iloc[0] if len(r) else np.inf for r in reach]),
                "reached (seeds)": sum(len(r) > 0 for r in reach),
            }
        )
    print(f"Command: `python {' '.join(sys.argv)}`\n")
    print(
        f"Tiny zoo, the demo's search space, {args.seeds} seed(s){' (quick budgets)' if args.quick else ''}; "
        f"target: GA-full's median final test accuracy {target:.4f}; {time.time() - start:.0f} s.\n"
    )
    print(pd.DataFrame(table).to_markdown(index=False, floatfmt=".4g"))
    _plot(curves, args.out / "efficiency.png")
    print(f"\nanytime curves: {args.out / 'efficiency.png'}")


def _plot(curves: dict[str, list[pd.DataFrame]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for name, runs in curves.items():
        grid = np.unique(np.concatenate([c["items"].to_numpy() for c in runs]))
        values = np.array([np.interp(grid, c["items"], c["test"].ffill(), left=np.nan) for c in runs])
        ax.plot(grid, np.nanmedian(values, axis=0), label=name)
        ax.fill_between(grid, np.nanmin(values, axis=0), np.nanmax(values, axis=0), alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("item evaluations (calibration included)")
    ax.set_ylabel("test accuracy of the best so far")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
