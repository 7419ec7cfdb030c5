"""The tiny model zoo: a Llama base and three experts fine-tuned on synthetic skills, built once and cached.

The base is pre-trained on every skill's easy form and on its full form written in another notation (see
:mod:`evomerge.skills`). Each expert continues from the base on one full skill in the task's notation, with
easy examples of all skills replayed against forgetting. An expert then gains a lot on its own skill and
little elsewhere, and its task vector is small and specific enough that task arithmetic over the three
experts beats every single expert on mean accuracy: the property that the merge search is meant to exploit.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from evomerge import skills
from evomerge.models import build_once, save_hf

# Bump when the build procedure changes in a way the recipe dict does not capture.
ZOO_VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
MANIFEST = "zoo.json"

RECIPE: dict = {
    "zoo_version": ZOO_VERSION,
    "skills_version": skills.SKILLS_VERSION,
    "skills": list(skills.SKILLS),
    "model": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    },
    # Rows hold whole examples from position 0 (the longest is 14 characters), where items are scored.
    "seq_len": 16,
    "base": {
        "steps": 800,
        "batch_size": 64,
        "lr": 3e-3,
        "warmup": 50,
        "weight_decay": 0.0,
        "levels": {"easy": 0.5, "alt": 0.5},
        # Addition takes the most examples to learn.
        "skill_weights": {"addition": 2.0, "script": 1.0, "reversal": 1.0},
        "seed": 0,
    },
    "expert": {
        "steps": 500,
        "batch_size": 32,
        "lr": 5e-4,
        "warmup": 30,
        "weight_decay": 0.0,
        # Replaying "alt" too would keep teaching the other skills, and experts would gain on them.
        "replay": 0.5,
        "replay_levels": {"easy": 1.0},
        "seed": 1,
    },
    "eval_split": "test",
    "threads": 2,
}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/evomerge``, or ``~/.cache/evomerge``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "evomerge"


def recipe_hash(recipe: dict) -> str:
    """12 hex digits identifying ``recipe``."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over :data:`evomerge.skills.ALPHABET`; it adds no special tokens."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *skills.ALPHABET])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=RECIPE["model"]["max_position_embeddings"],
    )


def build_model(tokenizer: PreTrainedTokenizerFast, recipe: dict, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama of the recipe's shape."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **recipe["model"],
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# --- training -------------------------------------------------------------------------------------------


def _pack_row(texts: Iterator[str], seq_len: int, vocab: dict[str, int]) -> list[int]:
    """Whole examples from ``texts`` packed from position 0 until the next one would not fit."""
    row: list[int] = []
    for text in texts:
        if len(row) + len(text) > seq_len:
            break
        row.extend(vocab[c] for c in text)
    return row


def _example_stream(rng: random.Random, pick, heldout: frozenset[str]) -> Iterator[str]:
    """Endless training texts; ``pick(rng)`` chooses (skill, level). Held-out prompts are never shown."""
    while True:
        skill, level = pick(rng)
        prompt, answer = skills.training_example(skill, rng, level)
        if level == "easy" or skills.task_prompt(prompt) not in heldout:
            yield prompt + answer


def _base_pick(levels: dict[str, float], skill_weights: dict[str, float] | None = None):
    """A skill drawn with ``skill_weights`` (uniform if None), then a level drawn with ``levels``."""
    names, weights = list(levels), list(levels.values())
    sw = [1.0] * len(skills.SKILLS) if skill_weights is None else [skill_weights[s] for s in skills.SKILLS]

    def pick(rng: random.Random) -> tuple[str, str]:
        return rng.choices(skills.SKILLS, sw)[0], rng.choices(names, weights)[0]

    return pick


def _batches(rows: Iterator[list[int]], batch_size: int, seq_len: int, pad_id: int) -> Iterator[torch.Tensor]:
    while True:
        batch = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
        for i in range(batch_size):
            row = next(rows)
            batch[i, : len(row)] = torch.tensor(row)
        yield batch


def _train(
    model: LlamaForCausalLM,
    rows: Iterator[list[int]],
    pad_id: int,
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    batch_size: int,
    seq_len: int,
    on_step=None,
) -> None:
    """AdamW with linear warmup then cosine decay to zero; loss on every non-pad token."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    batches = _batches(rows, batch_size, seq_len, pad_id)
    for _ in range(steps):
        batch = next(batches)
        labels = batch.masked_fill(batch == pad_id, -100)
        # Right padding needs no attention mask: causal attention never lets a real token see a later pad.
        loss = model(input_ids=batch, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(loss.item())
    model.eval()


def _rows(
    pick, seed: int, heldout: frozenset[str], seq_len: int, vocab: dict[str, int]
) -> Iterator[list[int]]:
    stream = _example_stream(random.Random(seed), pick, heldout)
    while True:
        yield _pack_row(stream, seq_len, vocab)


def _expert_rows(
    skill: str, recipe: dict, heldout: frozenset[str], vocab: dict[str, int]
) -> Iterator[list[int]]:
    """Rows of the full skill, with a ``replay`` fraction of rows from every skill against forgetting."""
    cfg, seq_len = recipe["expert"], recipe["seq_len"]
    seed = cfg["seed"] * 1000 + skills.SKILLS.index(skill)
    own = _rows(lambda rng: (skill, "full"), seed, heldout, seq_len, vocab)
    replay = _rows(_base_pick(cfg["replay_levels"]), seed + 500, heldout, seq_len, vocab)
    coin = random.Random(seed + 7)
    while True:
        yield next(replay) if coin.random() < cfg["replay"] else next(own)


# --- scoring --------------------------------------------------------------------------------------------


@torch.inference_mode()
def mc_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, items: Sequence[dict], batch_size: int = 1024
) -> float:
    """Fraction of ``items`` whose highest summed log-prob choice is the label (lm-eval ``acc``, no delimiter)."""
    return float(mc_correct(model, tokenizer, items, batch_size).float().mean())


@torch.inference_mode()
def mc_correct(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, items: Sequence[dict], batch_size: int = 1024
) -> torch.Tensor:
    """Per-item 0/1 correctness (bool tensor) under the same scoring as :func:`mc_accuracy`."""
    if not items:
        return torch.zeros(0, dtype=torch.bool)
    was_training = model.training
    model.eval()
    n_choices = len(items[0]["choices"])
    prompts = tokenizer([it["prompt"] for it in items], add_special_tokens=False)["input_ids"]
    conts = tokenizer([c for it in items for c in it["choices"]], add_special_tokens=False)["input_ids"]
    seqs, starts = [], []
    for i, prompt in enumerate(prompts):
        for cont in conts[i * n_choices : (i + 1) * n_choices]:
            seqs.append(prompt + cont)
            starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    for j, seq in enumerate(seqs):
        ids[j, : len(seq)] = torch.tensor(seq)
    lengths = torch.tensor([len(s) for s in seqs])
    pos = torch.arange(width)
    # Token t is scored by the logits at t-1; keep only continuation tokens.
    scored = (pos[None, 1:] >= torch.tensor(starts)[:, None]) & (pos[None, 1:] < lengths[:, None])
    device = next(model.parameters()).device
    totals = []
    for k in range(0, len(seqs), batch_size):
        chunk = ids[k : k + batch_size].to(device)
        logits = model(input_ids=chunk).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, chunk[:, 1:, None])[..., 0]
        totals.append((logp * scored[k : k + batch_size].to(device)).sum(-1).cpu())
    if was_training:
        model.train()
    scores = torch.cat(totals).view(len(items), n_choices)
    labels = torch.tensor([it["label"] for it in items])
    return scores.argmax(-1) == labels


def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, split: str = "test"
) -> dict[str, float]:
    """Accuracy of ``model`` on each skill's fitness ``split``."""
    return {s: mc_accuracy(model, tokenizer, skills.task_splits(s)[split]) for s in skills.SKILLS}


# --- building and caching -------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the duration."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def training_progress(enabled: bool | str | None, total: int) -> Iterator:
    """Yields ``update(description, loss)``: a rich progress bar when ``enabled`` (or "bar"), a line per
    5% of the steps with "lines" (output that is not a terminal), nothing otherwise."""
    if not enabled:
        yield lambda desc, loss: None
        return
    if enabled == "lines":
        start, done, step = time.monotonic(), 0, max(1, total // 20)

        def line(desc: str, loss: float) -> None:
            nonlocal done
            done += 1
            if done % step == 0 or done == total:
                print(
                    f"zoo {desc}: step {done}/{total}, loss {loss:.3f} ({time.monotonic() - start:.0f} s)",
                    flush=True,
                )

        yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]zoo[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("", total=total, loss=float("nan"))

        def update(desc: str, loss: float) -> None:
            bar.update(task, advance=1, description=desc, loss=loss)

        yield update


def _task_arithmetic(
    base: PreTrainedModel, experts: Sequence[PreTrainedModel], weight: float
) -> PreTrainedModel:
    """base + weight * sum(expert - base), as a new model."""
    merged = copy.deepcopy(base)
    origin = base.state_dict()
    state = {k: v.clone() for k, v in origin.items()}
    for expert in experts:
        for k, v in expert.state_dict().items():
            state[k] += weight * (v - origin[k])
    merged.load_state_dict(state)
    return merged


def _build(out: Path, recipe: dict, progress: bool) -> dict:
    """Train and save the whole zoo into ``out``; returns the manifest."""
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    heldout = skills.heldout_prompts()
    base_cfg, exp_cfg = recipe["base"], recipe["expert"]
    seq_len = recipe["seq_len"]

    def train(model: LlamaForCausalLM, rows: Iterator[list[int]], cfg: dict, on_step) -> None:
        _train(
            model,
            rows,
            pad_id=tokenizer.pad_token_id,
            steps=cfg["steps"],
            lr=cfg["lr"],
            warmup=cfg["warmup"],
            weight_decay=cfg["weight_decay"],
            batch_size=cfg["batch_size"],
            seq_len=seq_len,
            on_step=on_step,
        )

    accuracy: dict[str, dict[str, float]] = {}
    experts = []
    total = base_cfg["steps"] + exp_cfg["steps"] * len(recipe["skills"])
    # fork_rng: the build seeds torch itself and must not disturb the caller's random state.
    with (
        torch.random.fork_rng(),
        torch_threads(recipe["threads"]),
        training_progress(progress, total) as update,
    ):
        base = build_model(tokenizer, recipe, base_cfg["seed"])
        pick = _base_pick(base_cfg["levels"], base_cfg["skill_weights"])
        train(
            base,
            _rows(pick, base_cfg["seed"], heldout, seq_len, vocab),
            base_cfg,
            lambda x: update("base", x),
        )
        save_hf(out / "base", base, tokenizer)
        accuracy["base"] = evaluate(base, tokenizer, recipe["eval_split"])
        for skill in recipe["skills"]:
            expert = copy.deepcopy(base)
            torch.manual_seed(exp_cfg["seed"])
            on_step = lambda x, label=f"expert {skill}": update(label, x)  # noqa: E731
            train(expert, _expert_rows(skill, recipe, heldout, vocab), exp_cfg, on_step)
            save_hf(out / "experts" / skill, expert, tokenizer)
            accuracy[skill] = evaluate(expert, tokenizer, recipe["eval_split"])
            experts.append(expert)
        reference = evaluate(_task_arithmetic(base, experts, 0.5), tokenizer, recipe["eval_split"])
    return {
        "recipe": recipe,
        "hash": recipe_hash(recipe),
        "experts": list(recipe["skills"]),
        "accuracy": accuracy,
        # Not a zoo model: the untuned merge that a search should at least match.
        "reference_merges": {"task_arithmetic_0.5": reference},
        "build_seconds": round(time.perf_counter() - started, 1),
    }


def _complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def model_names() -> list[str]:
    """What ``zoo:<name>`` may name, known without building the zoo."""
    return ["base", *RECIPE["skills"]]


def is_built(cache_dir: Path | None = None) -> bool:
    """Whether the zoo of this recipe is already in the cache."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _complete(root / f"zoo-{recipe_hash(RECIPE)}")


def build_zoo(cache_dir: Path | None = None, force: bool = False, progress: bool | str | None = True) -> Path:
    """The zoo folder ``<cache_dir>/zoo-<hash12>/``, built on first use and reused afterwards.

    It holds ``base/`` and ``experts/<skill>/`` (Hugging Face folders with tokenizer) and ``zoo.json``.
    The build happens in a temporary folder renamed into place, so a killed build leaves no zoo behind.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = recipe_hash(RECIPE)
    final = cache_dir / f"zoo-{digest}"

    def build(tmp: Path) -> None:
        manifest = _build(tmp, RECIPE, progress)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    return build_once(final, build, force, complete=_complete)


def load_manifest(zoo_dir: Path) -> dict:
    """The ``zoo.json`` manifest of a built zoo."""
    return json.loads((Path(zoo_dir) / MANIFEST).read_text())
