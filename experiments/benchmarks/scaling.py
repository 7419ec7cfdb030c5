"""Search throughput: candidates per minute with 1 and 2 Ray workers, and the driver's per-candidate
overhead (dispatch to a worker + writing the store).

Reproduce (a few minutes on 2 cores, zoo cached):

    python experiments/benchmarks/scaling.py

Throughput runs the demo config (zoo models, lm-eval fitness on 100 items per task) for a GA of
``--pop`` x ``--generations`` with 1 and then 2 workers, and counts search candidates per minute of
search time (from the first generation's start to the last one's end; model loading excluded).
Overhead runs a Python fitness that returns at once on tiny random models, so a generation's wall time
is almost only overhead: per candidate, (generation wall time x workers) / candidates minus the
worker-side time (merge + fitness) recorded in the store.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # tiny.save_model_set and the test fitness functions


def _generation_spans(store) -> tuple[float, int, float]:
    """(search seconds, search candidates, summed worker seconds) from the store's timestamps."""
    rows = store.candidates(kind="search")
    first = min(c.created - c.wall_s for c in rows)
    last = max(c.created for c in rows)
    return last - first, len(rows), sum(c.wall_s for c in rows)


def throughput(workers: int, pop: int, generations: int, root: Path) -> dict:
    from evomerge.config import load_config
    from evomerge.search import Search
    from evomerge.store import Store

    cfg = load_config(
        ROOT / "experiments" / "demo.yaml",
        out=str(root / f"zoo-{workers}"),
        workers=workers,
        **{"algorithm.pop_size": pop, "algorithm.generations": generations, "fitness.items": 100},
    )
    start = time.perf_counter()
    run = Search(cfg).run()
    total = time.perf_counter() - start
    span, n, busy = _generation_spans(Store(run / "store.sqlite"))
    return {
        "setup": f"zoo, lm-eval 300 items, {workers} worker(s)",
        "candidates": n,
        "search s": round(span, 1),
        "candidates / min": round(60 * n / span, 1),
        "worker s / candidate": round(busy / n, 3),
        "run s (incl. Ray start, loading, test split)": round(total, 1),
    }


def overhead(pop: int, generations: int, root: Path) -> dict:
    from tiny import save_model_set

    from evomerge.config import parse_config
    from evomerge.search import Search
    from evomerge.store import Store

    models = save_model_set(root / "tiny", ["base", "a", "b"])
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    cfg = parse_config(
        {
            "models": {
                "base": str(models["base"]),
                "experts": {"a": str(models["a"]), "b": str(models["b"])},
            },
            "fitness": {"function": "fitness_fns:closeness"},
            "objectives": [{"name": "m", "of": "mean"}],
            "algorithm": {"name": "ga", "pop_size": pop, "generations": generations},
            "workers": 1,
            "out": str(root / "overhead"),
        }
    )
    run = Search(cfg).run()
    span, n, busy = _generation_spans(Store(run / "store.sqlite"))
    return {
        "setup": "tiny random models, instant Python fitness, 1 worker",
        "candidates": n,
        "search s": round(span, 2),
        "candidates / min": round(60 * n / span, 1),
        "worker s / candidate": round(busy / n, 4),
        "overhead ms / candidate": round(1000 * (span - busy) / n, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pop", type=int, default=16)
    ap.add_argument("--generations", type=int, default=3)
    args = ap.parse_args()
    import ray

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for workers in (1, 2):
            rows.append(throughput(workers, args.pop, args.generations, root))
            ray.shutdown()
        rows.append(overhead(64, 4, root))
        ray.shutdown()
    print(
        f"Reproduce: `python experiments/benchmarks/scaling.py --pop {args.pop} --generations {args.generations}`"
    )
    print(f"{os.cpu_count()} CPU(s)\n")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
