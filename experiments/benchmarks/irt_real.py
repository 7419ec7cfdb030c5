"""IRT estimators on real LLM answers: leave-one-model-out error of the estimated full-bank accuracy.

Reads a 0/1 response matrix of real models (rows: models, columns: items, no header; e.g. PSN-IRT's
``data/combine.csv``, 12 LLMs x 41,871 items of 11 benchmarks, from github.com/Joe-Hall-Lee/PSN-IRT; the
data is not part of evomerge: pass its path). For each held-out model the IRT model is fitted with py-irt
on the other models' answers to a random subsample of ``--calibration-items`` items, and the remaining
items are linked to it (:func:`evomerge.irt.link_items`, the fitted items held fixed), so that every item
of the bank has parameters. Then, for every item-draw seed, ``--items`` items are chosen by each selection
(random, anchor, information; information does not depend on the seed) and every estimator estimates the
held-out model's accuracy over the whole bank; the baseline is the plain mean of ``--items`` random
items. The adaptive test (:func:`evomerge.irt.adaptive_test`, ``--items`` items, seeded) is scored too,
with how often its true error is within 1.96 of its standard errors.

Estimators that need more than answers get: mpirt/gmpirt the training models' abilities as endpoints,
sgpirt a population prior (mean and variance of the training models' accuracies), since real LLMs have
no genome.

    python experiments/benchmarks/irt_real.py /tmp/psn/combine.csv
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import numpy as np

from evomerge import irt
from evomerge.machine import cpu_description

SELECTIONS = ("random", "anchor", "information")


def load(path: str) -> np.ndarray:
    """Models x items of 0/1: a CSV with or without a header row; transposed when it has more rows than
    columns (items as rows)."""
    with open(path) as f:
        first = f.readline().split(",")
    try:
        [float(v) for v in first]
        skip = 0
    except ValueError:
        skip = 1
    r = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float32)
    r = r.T if r.shape[0] > r.shape[1] else r
    if not np.isin(r, (0, 1)).all():
        sys.exit(f"{path}: expected 0/1 answers; got values {np.unique(r)[:10]}")
    return r


def fold(train: np.ndarray, cal: np.ndarray, model: str, epochs: int, seed: int) -> irt.IrtParams:
    """Fitted on ``cal`` items, the rest linked; items in the bank's order."""
    fitted = irt.fit_irt(train[:, cal], model=model, seed=seed, epochs=epochs)
    cols = np.concatenate([cal, np.setdiff1d(np.arange(train.shape[1]), cal)])
    whole = irt.fit_irt(train[:, cols], fixed=fitted)  # the other items linked, the fitted ones fixed
    return whole.subset(np.argsort(cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="CSV of 0/1 answers, models x items")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=5, help="item draws per held-out model")
    ap.add_argument("--calibration-items", type=int, default=3000)
    ap.add_argument("--model", default="2pl", choices=irt.MODELS)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--folds", type=int, default=0, help="held-out models (0: all)")
    args = ap.parse_args()
    started = time.time()
    r = load(args.path)
    n_models, n_items = r.shape
    estimators = [e for e in irt.ESTIMATORS if e != "mean"]
    errors: dict[tuple[str, str], list[float]] = {}
    plain, adaptive, covered, adaptive_mean = [], [], [], []
    folds = range(n_models if args.folds <= 0 else min(args.folds, n_models))
    for m in folds:
        train, row = np.delete(r, m, axis=0), r[m].astype(float)
        truth = row.mean()
        cal = np.sort(np.random.default_rng(m).choice(n_items, min(args.calibration_items, n_items), False))
        bank = fold(train, cal, args.model, args.epochs, seed=m)
        ends = np.stack([irt.fit_ability(bank, cal, t[cal].astype(float)) for t in train])
        acc = train.mean(axis=1)
        prior = (float(acc.mean()), float(acc.var()))
        for s in range(args.seeds):
            for sel in SELECTIONS:
                idx = irt.select_items(bank, args.items, sel, seed=s)
                w = irt.anchor_weights(bank, idx) if sel == "anchor" else None
                y = row[idx]
                if sel == "random":
                    plain.append(abs(y.mean() - truth))
                for est in estimators:
                    value = irt.estimate_accuracy(bank, idx, y, est, ends, w, prior)
                    errors.setdefault((est, sel), []).append(abs(value - truth))
            res = irt.adaptive_test(
                bank, lambda items, row=row: row[items], target_se=1e-9, max_items=args.items, seed=s
            )
            adaptive.append(abs(res.estimate - truth))
            adaptive_mean.append(abs(res.mean - truth))
            covered.append(abs(res.estimate - truth) <= 1.96 * res.se)
        print(f"fold {m}: truth {truth:.3f}, {time.time() - started:.0f} s", file=sys.stderr, flush=True)

    base = float(np.mean(plain))
    cmd = "python " + " ".join(sys.argv)
    print(f"# IRT on real LLM answers: leave-one-model-out MAE at {args.items} items")
    print(f"command: {cmd}")
    print(f"date: {datetime.date.today()}, machine: {cpu_description()}")
    print(
        f"data: {n_models} models x {n_items} items; {len(folds)} held-out models x {args.seeds} item draws; "
        f"IRT '{args.model}' fitted (py-irt, {args.epochs} epochs) on {len(cal)} random items per fold, the "
        f"other {n_items - len(cal)} linked (link_items); took {time.time() - started:.0f} s"
    )
    print(f"baseline: plain mean of {args.items} random items, MAE {base:.4f}\n")
    print("| estimator | " + " | ".join(SELECTIONS) + " |")
    print("|---|" + "---|" * len(SELECTIONS))
    for est in estimators:
        cells = []
        for sel in SELECTIONS:
            mae = float(np.mean(errors[(est, sel)]))
            cells.append(f"{mae:.4f} ({100 * (mae / base - 1):+.0f}%)")
        print(f"| {est} | " + " | ".join(cells) + " |")
    best = min(errors, key=lambda k: np.mean(errors[k]))
    print(
        f"\nbest: {best[0]}/{best[1]}, {100 * (1 - np.mean(errors[best]) / base):.0f}% below the plain mean"
    )
    print(
        f"adaptive test ({args.items} items): MAE {np.mean(adaptive):.4f} ({100 * (np.mean(adaptive) / base - 1):+.0f}% "
        f"vs the plain mean of random items); plain mean of its own items {np.mean(adaptive_mean):.4f}; "
        f"true error within 1.96 SE in {100 * np.mean(covered):.0f}% of {len(covered)} cases"
    )


if __name__ == "__main__":
    main()
