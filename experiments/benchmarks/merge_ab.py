"""One merge method's speed at another revision against the working tree, alternating processes: on a
machine whose speed drifts between runs, the ratio of a merge to an eager task-arithmetic loop timed
beside it in the same process moves far less than either time.

Reproduce (a few minutes; the model files of ``merge_speed.py --dir DIR``, built there if missing):

    python experiments/benchmarks/merge_ab.py --rev HEAD~1 --method dare_linear --dir DIR

Each round runs the revision, then the working tree, in fresh processes (the revision from a temporary
``git worktree`` put first on ``PYTHONPATH``); each process merges ``--merges`` times with keyed masks
(as a search worker) into one preallocated model, alternating with the eager loop
``out = base + 0.6 d1 + 0.4 d2`` (``merge_speed.py``'s fused floor), and prints the median merge time
and the median ratio to the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def measure(folder: Path, method: str, merges: int, threads: int) -> dict:
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(HERE))
    from merge_speed import METHODS, fused_baseline, per_k

    from evomerge.merge import Merger

    torch.set_num_threads(threads)
    sds = {n: load_file(str(folder / f"{n}.safetensors")) for n in ["base", "a", "b"]}
    merger = Merger(sds["base"], {"a": sds["a"], "b": sds["b"]}, seed=0)
    merger.random = "keyed"
    out = {k: torch.empty_like(t) for k, t in sds["base"].items()}
    params = per_k(METHODS[method])

    def merge() -> None:
        merger.merge(method, params, out=out)

    deltas = [{k: sds[e][k] - b for k, b in sds["base"].items()} for e in ("a", "b")]

    def loop() -> None:  # merge_speed.py's fused task-arithmetic floor
        fused_baseline(sds["base"], deltas, out, [0.6, 0.4])

    merge(), merge(), loop()  # compile, caches, first touch
    times, ratios = [], []
    for _ in range(merges):
        start = time.perf_counter()
        merge()
        t = time.perf_counter() - start
        start = time.perf_counter()
        loop()
        times.append(t)
        ratios.append(t / (time.perf_counter() - start))
    return {"median_s": statistics.median(times), "ratio": statistics.median(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the git revision to compare the working tree with")
    ap.add_argument("--method", default="dare_linear")
    ap.add_argument("--dir", type=Path, required=True, help="merge_speed.py's model files (built if missing)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--merges", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.dir, args.method, args.merges, args.threads)))
        return
    sys.path.insert(0, str(HERE))
    from merge_speed import build_models

    from evomerge.machine import cpu_description

    if not all((args.dir / f"{n}.safetensors").exists() for n in ["base", "a", "b"]):
        args.dir.mkdir(parents=True, exist_ok=True)
        build_models(args.dir)
    child = [sys.executable, __file__, "--child", "--rev", args.rev, "--method", args.method]
    child += ["--dir", str(args.dir), "--merges", str(args.merges), "--threads", str(args.threads)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "rev"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.rev], check=True
        )
        try:
            for r in range(args.rounds):
                for side, path in ((args.rev, str(tree)), ("working tree", "")):
                    env = {**os.environ, "PYTHONPATH": path} if path else os.environ
                    run = subprocess.run(child, env=env, check=True, capture_output=True, text=True)
                    rows.append({"round": r + 1, "side": side, **json.loads(run.stdout.splitlines()[-1])})
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    print(
        f"Reproduce: `python experiments/benchmarks/merge_ab.py --rev {args.rev} --method {args.method} "
        f"--dir DIR`; {cpu_description()}; keyed {args.method}, K = 2, SmolLM2-135M shape, "
        f"{args.threads} thread(s); median of {args.merges} merges per process.\n"
    )
    print("| round | side | merge s | merge / fused task-arithmetic floor |")
    print("|---:|---|---:|---:|")
    for row in rows:
        print(f"| {row['round']} | {row['side']} | {row['median_s']:.3f} | {row['ratio']:.2f} |")


if __name__ == "__main__":
    main()
