"""Search efficiency: the peers' recipes and evomerge's, as evomerge configurations of one search space,
side by side over seeds: the best candidate's test accuracy against model evaluations and against item
evaluations (calibration included), and the item evaluations each needs to reach the final test
accuracy of the GA with full-split fitness.

    python experiments/benchmarks/search_efficiency.py [--seeds 5] [--recipes ga_full,bo_adaptive]
        [--zoo tiny|real] [--out runs/efficiency] [--quick]

Every IRT recipe runs twice per seed: ``<recipe>`` is a config's first run, which calibrates (sized to
its budget: ``fitness.calibration`` auto) and builds its item bank inside it, calibration counted;
``<recipe>_second`` is a later run of the same config (seed + 1000) with that bank (``estimation.bank``),
which pays no calibration: the bank's cost is counted once, in the first run.

``--zoo tiny`` (default) is the demo's search space on the tiny zoo with the demo's budget (128
candidates); ``--zoo real`` is ``experiments/real_smollm2.yaml``'s on the SmolLM2-135M zoo (`evomerge zoo
build --real`) at a reduced budget (16 candidates), GA + full fitness against BO + adaptive items, where
wall time is the figure. Runs are kept in ``--out/<recipe>-<seed>`` (with the wall time of a run made
start to finish in one go) and resumed or reused when the script runs again. ``--quick`` shrinks every
budget 4x (a smoke run of the harness, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from evomerge.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars, for the test-split scoring here
# each zoo: the config the recipes change, and the calibration of its IRT recipes
ZOOS = {
    "tiny": {"config": "demo.yaml", "calibration": {}},  # auto: sized to the run's budget
    "real": {"config": "real_smollm2.yaml", "calibration": {"random_merges": 8}},
}


def recipes(zoo: str, quick: bool) -> dict[str, dict[str, Any]]:
    """Each recipe's config changes: algorithm, budget, fitness items, objective."""
    shrink = 4 if quick else 1
    plain = {"name": "mean_accuracy", "of": "mean"}
    if zoo == "real":  # one worker of two threads
        adaptive = {**plain, "estimator": "sgpirt", "items": "adaptive", "max_items": 12, "race": True}
        return {
            "ga_full": {
                "algorithm": {
                    "name": "ga",
                    "pop_size": 8,
                    "generations": 2 // min(shrink, 2),
                    "initial": "experts",
                },
                "items": None,
                "objective": plain,
            },
            "bo_adaptive": {
                "algorithm": {"name": "bo", "pop_size": 2, "generations": 8 // shrink, "initial": "experts"},
                "objective": adaptive,
            },
        }
    pop, gens = 16 // shrink, 8 // shrink

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
        # BO on a fixed random subset, plain accuracy: no calibration to pay for
        "bo_subset": {"algorithm": bo, "items": 40, "objective": plain},
        "bo_sgpirt": {
            "algorithm": bo,
            "objective": irt(estimator="sgpirt", items=12, selection="information"),
        },
        # BO with rc-IRT on 24 random items (64 x 24 = GA-full's item budget / 50)
        "bo_rcirt": {"algorithm": bo, "objective": irt(estimator="rcirt", items=24, selection="random")},
        # bo_sgpirt calibrated as before banks: 20 random merges on the whole split (24 x 600 items)
        "bo_sgpirt_fullcal": {
            "algorithm": bo,
            "objective": irt(estimator="sgpirt", items=12, selection="information"),
            "calibration": {"random_merges": 20, "items": "all"},
        },
        "bo_adaptive": {
            "algorithm": bo,
            "objective": irt(estimator="sgpirt", items="adaptive", max_items=12, target_se=0.05, race=True),
        },
    }


def with_second_runs(catalogue: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each IRT recipe followed by ``<name>_second``: the same config, run again with the first run's bank."""
    out = {}
    for name, recipe in catalogue.items():
        out[name] = recipe
        if "estimator" in recipe["objective"]:
            out[f"{name}_second"] = {**recipe, "second_of": name}
    return out


def config(zoo: str, recipe: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "experiments" / ZOOS[zoo]["config"]).read_text())
    data["fitness"].pop("items", None)
    if recipe.get("items"):
        data["fitness"]["items"] = recipe["items"]
    if "estimator" in recipe["objective"]:
        data["fitness"]["calibration"] = recipe.get("calibration", ZOOS[zoo]["calibration"])
    data.update(objectives=[recipe["objective"]], algorithm=recipe["algorithm"], seed=seed, out=str(out))
    if "second_of" in recipe:  # a later run of the config: another seed, the first run's bank
        data["seed"] = seed + 1000
        data["estimation"] = {"bank": str(out.parent / "banks" / f"{out.name}.npz")}
    return data


def run_one(zoo: str, name: str, recipe: dict[str, Any], seed: int, root: Path) -> Path:
    """Run (or resume, or reuse) one recipe and seed; a run made in one go records its wall time, from
    the config to the finished folder (loading, calibration, search and final evaluations)."""
    from evomerge.config import parse_config
    from evomerge.search import Search, resume_search

    out = root / f"{name}-{seed}"
    if RunFolder(out).finished():
        return out
    if (out / "store.sqlite").exists():
        (out / "efficiency_wall.json").unlink(missing_ok=True)  # no longer one go
        return resume_search(out).resume()
    if "second_of" in recipe:  # a copy of the first run's bank, which this run then grows
        first = run_one(
            zoo, recipe["second_of"], {k: v for k, v in recipe.items() if k != "second_of"}, seed, root
        )
        used = json.loads((first / "irt" / "bank.json").read_text())["bank"]
        (root / "banks").mkdir(parents=True, exist_ok=True)
        shutil.copy(used, root / "banks" / f"{out.name}.npz")
    # every run's cached banks in a folder of its own: no first run finds a bank another run built
    os.environ["EVOMERGE_BANKS"] = str(root / "banks" / out.name)
    start = time.time()
    Search(parse_config(config(zoo, recipe, seed, out))).run()
    (out / "efficiency_wall.json").write_text(json.dumps({"seconds": time.time() - start}))
    return out


def test_accuracy(run: Any, ids: list[int]) -> dict[int, float]:
    """The test-split mean accuracy of candidates ``ids`` (re-merged in this process, scored by lm-eval),
    cached in ``RUN_DIR/efficiency_test.json``."""
    import torch

    from evomerge.fitness.lmeval import LmEvalFitness

    path = run.path / "efficiency_test.json"
    cache = {int(k): v for k, v in (json.loads(path.read_text()) if path.is_file() else {}).items()}
    todo = [i for i in ids if i not in cache]
    if todo:
        fitness = LmEvalFitness(list(run.config.fitness.tasks))
        for i in todo:
            model, tok = run.load_model(i)
            with torch.no_grad():
                cache[i] = float(fitness.evaluate(model, tok, "test").values["mean"])
        path.write_text(json.dumps(cache))
    return cache


def anytime(run_dir: Path) -> pd.DataFrame:
    """Per generation (the report's progress table): model and item evaluations so far (calibration
    included), the best candidate by its search value so far, and that candidate's test accuracy. Not
    on the curve: the whole-split re-scoring of an IRT run's final front (``attrs["rescored"]``) and
    every run's test-split scoring."""
    from evomerge.report.figures import progress_table
    from evomerge.run import load_run

    run = load_run(run_dir)
    progress = progress_table(run)
    df = pd.DataFrame(
        {
            "generation": progress.index,
            "models": progress.models_so_far.to_numpy(),
            "items": progress.items_so_far.to_numpy(),
            "best_id": progress.best_id_so_far_mean_accuracy.to_numpy(),
        }
    )
    rows = run.candidates
    df.attrs["items per candidate"] = float(rows[rows.kind == "search"].n_items.mean())
    df.attrs["rescored"] = int(rows[rows.kind == "full"].n_items.sum())  # an IRT run's front, at the end
    df.attrs["calibration"] = int(rows[rows.kind == "calibration"].n_items.sum())  # in "items" already
    wall = run_dir / "efficiency_wall.json"
    df.attrs["wall s"] = json.loads(wall.read_text())["seconds"] if wall.is_file() else np.nan
    tests = test_accuracy(run, sorted({int(i) for i in df.best_id.dropna()}))
    df["test"] = df.best_id.map(lambda i: tests.get(int(i), np.nan) if i == i else np.nan)
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--recipes", default="all", help="comma-separated names, or all")
    ap.add_argument("--zoo", choices=list(ZOOS), default="tiny")
    ap.add_argument(
        "--out", type=Path, default=None, help="default: runs/efficiency (tiny), runs/efficiency-real"
    )
    ap.add_argument("--quick", action="store_true", help="every budget 4x smaller (a smoke run)")
    ap.add_argument(
        "--report", action="store_true", help="table and plot of the finished runs only, run nothing"
    )
    args = ap.parse_args()
    out = args.out or ROOT / "runs" / ("efficiency" if args.zoo == "tiny" else "efficiency-real")
    catalogue = with_second_runs(recipes(args.zoo, args.quick))
    names = list(catalogue) if args.recipes == "all" else args.recipes.split(",")
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        sys.exit(f"error: unknown recipe {unknown[0]!r}; allowed: {', '.join(catalogue)}")
    start = time.time()
    curves: dict[str, list[pd.DataFrame]] = {}
    for seed in range(args.seeds):  # seed by seed, so that a partial sweep covers every recipe
        for name in names:
            if args.report and not RunFolder(out / f"{name}-{seed}").finished():
                continue
            curves.setdefault(name, []).append(anytime(run_one(args.zoo, name, catalogue[name], seed, out)))
    print(f"Command: `python {' '.join(sys.argv)}`\n")
    target_runs = curves.get("ga_full")
    target = float(np.median([c.test.iloc[-1] for c in target_runs])) if target_runs else np.nan
    budget = float(np.median([c["items"].iloc[-1] for c in target_runs])) if target_runs else np.nan
    print(
        f"{'Tiny zoo, the demo' if args.zoo == 'tiny' else 'SmolLM2-135M zoo, real_smollm2.yaml'}'s search "
        f"space, at most {args.seeds} seed(s){' (quick budgets)' if args.quick else ''}; target: GA-full's median "
        f"final test accuracy {target:.4f}, GA-full's item evaluations {budget:.0f}; "
        f"{time.time() - start:.0f} s.\n"
    )
    df = table(curves, target, budget)
    if args.zoo == "tiny":  # the tiny zoo's figures are evaluations; its runs share the machine with others
        df = df.drop(columns="wall s", errors="ignore")
    print(df.to_markdown(index=False, floatfmt=".3g"))
    _plot(curves, target, out / "efficiency.png")
    print(f"\nanytime curves (median, min-max over seeds): {out / 'efficiency.png'}")
    firsts = [out / f"{name}-0" for name in curves if RunFolder(out / f"{name}-0").finished()]
    if len(firsts) > 1:  # `evomerge compare` of each recipe's first seed: fronts and progress, interactive
        from evomerge.report.compare import write_compare

        print(f"seed 0 of each recipe, side by side: {write_compare(firsts, out / 'compare.html')}")


def table(curves: dict[str, list[pd.DataFrame]], target: float, budget: float) -> pd.DataFrame:
    """Medians over seeds per recipe; "items to target" is inf for a seed that never reached it."""
    rows = []
    for name, runs in curves.items():
        reach = [c[c.test >= target] for c in runs]
        to_target = float(np.median([r["items"].iloc[0] if len(r) else np.inf for r in reach]))
        rows.append(
            {
                "recipe": name,
                "seeds": len(runs),
                "final test": np.median([c.test.iloc[-1] for c in runs]),
                "test min-max": f"{min(c.test.iloc[-1] for c in runs):.3f}-{max(c.test.iloc[-1] for c in runs):.3f}",
                "models": np.median([c.models.iloc[-1] for c in runs]),
                "items / candidate": np.median([c.attrs["items per candidate"] for c in runs]),
                "item evaluations": np.median([c["items"].iloc[-1] for c in runs]),
                "of which calibration": np.median([c.attrs["calibration"] for c in runs]),
                "+ front re-scored": np.median([c.attrs["rescored"] for c in runs]),
                "reached target (seeds)": f"{sum(len(r) > 0 for r in reach)}/{len(runs)}",
                "models to target": np.median([r.models.iloc[0] if len(r) else np.inf for r in reach]),
                "items to target": to_target,
                "GA-full's items / these": budget / to_target,
                "wall s": np.median([c.attrs["wall s"] for c in runs]),
            }
        )
    df = pd.DataFrame(rows)
    for column in [
        "models",
        "of which calibration",
        "item evaluations",
        "+ front re-scored",
        "models to target",
        "items to target",
    ]:
        df[column] = [f"{v:,.0f}" if np.isfinite(v) else "never" for v in df[column]]
    return df.dropna(axis=1, how="all")  # wall s: only runs made in one go have it


def _steps(c: pd.DataFrame, axis: str, grid: np.ndarray) -> np.ndarray:
    """The best-so-far test accuracy at each grid point (a step function: the last value at or before)."""
    at = np.searchsorted(c[axis].to_numpy(), grid, side="right") - 1
    values = c["test"].ffill().to_numpy()
    return np.where(at >= 0, values[np.clip(at, 0, None)], np.nan)


def _plot(curves: dict[str, list[pd.DataFrame]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained", sharey=True)
    for ax, axis, label in zip(
        axes, ["models", "items"], ["model evaluations", "item evaluations"], strict=True
    ):
        for name, runs in curves.items():
            grid = np.unique(np.concatenate([c[axis].to_numpy() for c in runs]))
            values = np.array([_steps(c, axis, grid) for c in runs])
            (line,) = ax.step(grid, np.nanmedian(values, axis=0), where="post", label=name)
            ax.fill_between(
                grid,
                np.nanmin(values, axis=0),
                np.nanmax(values, axis=0),
                step="post",
                alpha=0.12,
                color=line.get_color(),
            )
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (calibration included)")
    axes[0].set_ylabel("test accuracy of the best so far")
    axes[1].legend(fontsize=8, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
