"""Check that the tiny zoo is fit for merging: experts beat the base on their own skill, and merges beat experts.

    python experiments/zoo_check.py                      # the cached zoo of the current recipe
    python experiments/zoo_check.py --fresh base.steps=600 expert.lr=5e-4   # a variant, built in a temp dir

Prints test accuracy per skill and mean for the base, each expert, the task-arithmetic merge with weight 0.5,
and the merge whose per-expert weights are tuned on the search split.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.merge import merge_state_dicts
from evomerge.zoos import scoring, skills
from evomerge.zoos import tiny as zoo
from evomerge.zoos.build import load_manifest


def _override(recipe: dict, assignment: str) -> None:
    key, value = assignment.split("=", 1)
    *path, last = key.split(".")
    node = recipe
    for part in path:
        node = node[part]
    node[last] = json.loads(value)


def task_arithmetic(base: dict, experts: list[dict], weights: list[float]) -> dict:
    inputs = {"base": base, **{f"e{i}": sd for i, sd in enumerate(experts)}}
    return merge_state_dicts(inputs, "task_arithmetic", base="base", parameters={"weight": weights})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("overrides", nargs="*", help="recipe overrides key.sub=json")
    parser.add_argument("--fresh", action="store_true", help="build into a temporary folder")
    parser.add_argument("--grid", default="0.3,0.5,0.7,0.9,1.1")
    args = parser.parse_args()

    recipe = copy.deepcopy(zoo.RECIPE)
    for assignment in args.overrides:
        _override(recipe, assignment)
    if args.fresh or args.overrides:
        root = Path(tempfile.mkdtemp(prefix="zoo-check-"))
        manifest = zoo._build(root, recipe, progress=False)
        print(f"built in {manifest['build_seconds']} s")
    else:
        root = zoo.build_zoo()
        manifest = load_manifest(root)
        print(f"cached zoo {root} (built in {manifest['build_seconds']} s)")

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    expert_sds = [
        AutoModelForCausalLM.from_pretrained(root / "experts" / s).state_dict() for s in recipe["skills"]
    ]

    def scores(sd: dict, split: str) -> dict[str, float]:
        model.load_state_dict(sd)
        acc = scoring.evaluate(model, tok, split)
        acc["mean"] = sum(acc.values()) / len(acc)
        return acc

    rows = {"base": scores(base_sd, "test")}
    for s, sd in zip(recipe["skills"], expert_sds, strict=True):
        rows[s] = scores(sd, "test")
    rows["ta-0.5"] = scores(task_arithmetic(base_sd, expert_sds, [0.5] * 3), "test")

    started = time.perf_counter()
    grid = [float(g) for g in args.grid.split(",")]
    best = max(
        itertools.product(grid, repeat=3),
        key=lambda w: scores(task_arithmetic(base_sd, expert_sds, list(w)), "search")["mean"],
    )
    rows[f"ta-tuned {best}"] = scores(task_arithmetic(base_sd, expert_sds, list(best)), "test")
    tune_s = time.perf_counter() - started

    print(f"{'model':28s}" + "".join(f"{s:>10s}" for s in [*skills.SKILLS, "mean"]))
    for name, acc in rows.items():
        print(f"{name:28s}" + "".join(f"{acc[s]:10.3f}" for s in [*skills.SKILLS, "mean"]))
    best_expert = max(rows[s]["mean"] for s in recipe["skills"])
    print(f"ta-0.5 - best expert: {rows['ta-0.5']['mean'] - best_expert:+.3f}")
    print(
        f"tuned - best expert:  {list(rows.values())[-1]['mean'] - best_expert:+.3f}  (tuning {tune_s:.0f} s)"
    )


if __name__ == "__main__":
    main()
