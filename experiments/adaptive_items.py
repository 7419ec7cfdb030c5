"""Adaptive items against fixed subsets on a simulated 2PL, with item parameters fitted (py-irt) on a
calibration sample as in a run: per target standard error, the adaptive test's items and errors on
held-out subjects against p-IRT on as many random and as many anchor items, and against the plain mean
of the items the test asked.

    python experiments/adaptive_items.py [--calibration 60] [--items 200] [--subjects 100]
"""

from __future__ import annotations

import argparse
import sys
import time

from evomerge import irt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--calibration", type=int, default=60, help="calibration subjects the parameters are fitted on"
    )
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--subjects", type=int, default=100, help="held-out subjects")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    start = time.time()
    responses, _ = irt.simulate_2pl(args.calibration + args.subjects, args.items, seed=args.seed)
    params = irt.fit_irt(responses[: args.calibration], seed=0)
    held_out = responses[args.calibration :]
    rows = []
    for target in (0.03, 0.04, 0.05, 0.06):
        c = irt.check_adaptive(params, held_out, target_se=target, max_items=args.items, seed=args.seed)
        rows.append((target, c))
    print(f"Command: `python {' '.join(sys.argv)}`\n")
    print(
        f"Simulated 2PL, {args.items} items; parameters fitted on {args.calibration} subjects; "
        f"{args.subjects} held-out subjects; MAE of the full-set accuracy ({time.time() - start:.0f} s).\n"
    )
    print(
        "| target SE | items (mean) | adaptive | mean of the same items | random items, p-IRT | anchor items, p-IRT | SE scale |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for target, c in rows:
        print(
            f"| {target} | {c.items:.1f} | {c.mae_irt:.4f} | {c.mae_mean:.4f} | {c.mae_random:.4f} | "
            f"{c.mae_anchor:.4f} | {c.se_scale:.2f} |"
        )


if __name__ == "__main__":
    main()
