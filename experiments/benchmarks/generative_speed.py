"""Generative fitness speed: evomerge's lm-eval backend against lm-eval's own ``simple_evaluate`` on the
same model and items, side by side in one process, and the share of a candidate's time spent merging
against evaluating.

Reproduce (nothing else running; the zoo is built or found in the cache first):

    python experiments/benchmarks/generative_speed.py --zoo tiny --threads 2
    python experiments/benchmarks/generative_speed.py --zoo real --threads 2   # pip install -e '.[real]'

What is measured, in one process with ``--threads`` torch threads:

- The generative demo's tasks (``zoo_gsm8k`` with flexible-extract, ``zoo_script_gen``,
  ``zoo_reversal_gen``; ``--fewshot`` examples per prompt), ``--items`` items of each on the search
  split, scored on one merged model (task arithmetic, every weight 0.5) by evomerge's ``LmEvalFitness``
  and by ``lm_eval.simple_evaluate`` with an ``HFLM`` over the same in-memory model and the same batch
  size. The two alternate ``--repeat`` times; the table gives the median seconds and items per second.
  evomerge's first call (which builds each item's requests, kept for every later candidate) is given
  apart. The per-item scores of both must be equal (the table says so).
- A candidate's time on a worker as a search spends it (``Worker.evaluate``): merging its recipe into the
  worker's model and evaluating it, the median over ``--repeat`` candidates of random genomes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evomerge.machine import cpu_description

TASKS = ["zoo_gsm8k", "zoo_script_gen", "zoo_reversal_gen"]
MEASURES = {"zoo_gsm8k": [None, "flexible-extract"]}


def zoo_models(zoo: str) -> dict:
    if zoo == "tiny":
        from evomerge.zoos.tiny import build_zoo

        root = build_zoo(progress=False)
        experts = ["addition", "script", "reversal"]
    else:
        from evomerge.zoos.smollm2 import build_real_zoo

        root = build_real_zoo(progress=True)
        experts = sorted(p.name for p in (root / "experts").iterdir())
    return {
        "base": str(root / "base"),
        "experts": {e: str(root / "experts" / e) for e in experts},
        "tokenizer": None,
        "dtype": "float32",
    }


def theirs(lm, task_configs: list[dict], samples: dict[str, list[int]], fewshot: int) -> dict:
    """lm-eval's own evaluation: per-item scores of each task's measure."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=lm,
        tasks=task_configs,
        samples=samples,
        num_fewshot=fewshot or None,
        bootstrap_iters=0,
        log_samples=True,
        task_manager=TaskManager(include_defaults=False),
        verbosity="ERROR",
    )
    wanted = {"zoo_gsm8k": "flexible-extract"}
    return {
        t: {
            str(s["doc_id"]): float(s["exact_match"])
            for s in out["samples"][t]
            if s["filter"] == wanted.get(t, "none")
        }
        for t in samples
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--items", type=int, default=200, help="items per task (search split)")
    parser.add_argument("--fewshot", type=int, default=0, help="few-shot examples per prompt")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from evomerge.fitness.lmeval import LmEvalFitness
    from evomerge.fitness.tasks import catalog_config, catalog_tasks
    from evomerge.jobs import Job
    from evomerge.searchspace import SearchSpace, load_space_config
    from evomerge.workers import Worker

    models = zoo_models(args.zoo)
    spec = {
        "tasks": TASKS,
        "batch_size": args.batch_size,
        "num_fewshot": args.fewshot or None,
        "measures": MEASURES,
        "seed": 0,
    }
    worker = Worker(models, spec, threads=args.threads)
    space = SearchSpace(load_space_config("per_layer"), list(models["experts"]), worker.models.num_layers())
    half = space.decode([0.5] * space.n_var)
    model, tokenizer = worker.materialize(half), worker.tokenizer
    n = min(args.items, min(worker.fitness.n_items("search").values()))
    items = {t: list(range(n)) for t in TASKS}

    # evomerge's fitness: a fresh backend's first call builds the requests, later calls reuse them
    fitness = LmEvalFitness(
        TASKS, batch_size=args.batch_size, num_fewshot=args.fewshot or None, measures=MEASURES
    )
    with torch.no_grad():
        start = time.perf_counter()
        first = fitness.evaluate(model, tokenizer, "search", items)
        first_s = time.perf_counter() - start
    configs = [catalog_config(catalog_tasks()[t], "search") for t in TASKS]
    ours_s, theirs_s, same = [], [], True
    for _ in range(args.repeat):
        with torch.no_grad():
            start = time.perf_counter()
            result = fitness.evaluate(model, tokenizer, "search", items)
            ours_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            reference = theirs(fitness._hflm(model, tokenizer), configs, items, args.fewshot)
            theirs_s.append(time.perf_counter() - start)
        same &= all(result.responses[t] == reference[t] for t in TASKS)
    n_items = n * len(TASKS)

    # a candidate's time on a worker: merge, then evaluate (random genomes, as a search's first generation)
    merge_s, eval_s = [], []
    rng = np.random.default_rng(0)
    for _ in range(args.repeat):
        recipe = space.decode(rng.random(space.n_var).tolist())
        start = time.perf_counter()
        worker.materialize(recipe)
        merge_s.append(time.perf_counter() - start)
        job = Job(tag=None, recipe=recipe, split="search", items=items)
        result = worker.evaluate(job)
        eval_s.append(result.wall_s - merge_s[-1])

    med = statistics.median
    print(
        f"\nGenerative fitness, {args.zoo} zoo ({worker.models.num_layers()} layers), {n} items x "
        f"{len(TASKS)} tasks ({', '.join(TASKS)}), {args.fewshot}-shot, batch {args.batch_size}, "
        f"{args.threads} threads, {cpu_description()}, torch {torch.__version__}; "
        f"median of {args.repeat}, alternating\n"
    )
    print("| | s per candidate | items / s | vs simple_evaluate |")
    print("|---|---:|---:|---:|")
    base = med(theirs_s)
    print(f"| lm-eval simple_evaluate | {base:.2f} | {n_items / base:.0f} | 1.00x |")
    print(
        f"| evomerge LmEvalFitness | {med(ours_s):.2f} | {n_items / med(ours_s):.0f} | {base / med(ours_s):.2f}x |"
    )
    print(
        f"| evomerge, first call (builds the requests) | {first_s:.2f} | {n_items / first_s:.0f} | "
        f"{base / first_s:.2f}x |"
    )
    print(
        f"\nper-item scores equal to lm-eval's: {'yes' if same else 'NO'}; "
        f"mean exact match of the 0.5 merge: {first.values['mean']:.3f}"
    )
    total = med(merge_s) + med(eval_s)
    print(
        f"\nA candidate on a worker (median of {args.repeat}): merge {med(merge_s):.3f} s "
        f"({100 * med(merge_s) / total:.1f}%), evaluate {med(eval_s):.2f} s ({100 * med(eval_s) / total:.1f}%)"
    )
    print(f"\nReproduce: python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")


if __name__ == "__main__":
    main()
