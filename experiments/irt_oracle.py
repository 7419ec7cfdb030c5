"""Oracle vs fitted IRT accuracy estimates on responses simulated from a known 2PL model.

    python experiments/irt_oracle.py                       # 1000 items, 300 calibration + 300 test subjects
    python experiments/irt_oracle.py --calibration 200 --epochs 200 --seed 1

Prints the mean absolute error (over the test subjects) of the estimated full-set accuracy for: the irt
estimator with the true parameters on the 20 most discriminating items (the oracle), the plain mean of 20
random items (a fresh subset per subject), and every estimator x selector with parameters fitted by
evomerge.irt.fit_irt on the calibration subjects. mpirt/gmpirt use as endpoints the fitted abilities of the
lowest- and highest-ability calibration subjects (every test ability is then a combination with lambda >= 0).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from evomerge import irt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=300)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--n", type=int, default=20, help="items each estimate sees")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    responses, true = irt.simulate_2pl(args.calibration + args.test, args.items, seed=args.seed)
    cal, test = responses[: args.calibration], responses[args.calibration :]
    acc = test.mean(axis=1)

    def mae(estimates: list[float]) -> float:
        return float(np.mean(np.abs(np.array(estimates) - acc)))

    top = np.sort(np.argsort(-true.a[:, 0])[: args.n])
    rows = [("oracle: true params, irt, top-a", mae([irt.estimate_irt(true, top, r[top]) for r in test]))]
    rng = np.random.default_rng(args.seed + 1)
    subsets = [rng.choice(args.items, args.n, replace=False) for _ in test]
    rows.append(("plain mean, random", mae([r[s].mean() for r, s in zip(test, subsets, strict=True)])))

    start = time.perf_counter()
    params = irt.fit_irt(cal, seed=args.seed, epochs=args.epochs)
    fit_s = time.perf_counter() - start
    ends = params.theta[[np.argmin(cal.mean(axis=1)), np.argmax(cal.mean(axis=1))]]
    for method in irt.SELECTORS:
        idx = irt.select_items(params, args.n, method, seed=args.seed)
        weights = irt.anchor_weights(params, idx) if method == "anchor" else None
        for est in irt.ESTIMATORS:
            values = [irt.estimate_accuracy(params, idx, r[idx], est, ends, weights) for r in test]
            rows.append((f"fitted: {est}, {method}", mae(values)))

    oracle = rows[0][1]
    print(f"{args.items} items, {args.calibration} calibration / {args.test} test subjects, n={args.n}")
    print(f"fit_irt: {fit_s:.1f} s ({args.epochs} epochs x 2 fits), irt_bias={params.irt_bias:.4f}")
    print(f"{'estimate':40s} {'MAE':>7s} {'/oracle':>8s}")
    for name, value in rows:
        print(f"{name:40s} {value:7.4f} {value / oracle:8.2f}")


if __name__ == "__main__":
    main()
