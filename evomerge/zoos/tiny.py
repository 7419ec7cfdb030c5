"""The tiny model zoo: a Llama base and three experts fine-tuned on synthetic skills, built once and cached.

The base is pre-trained on every skill's easy form and on its full form written in another notation (see
:mod:`evomerge.zoos.skills`). Each expert continues from the base on one full skill in the task's notation,
with easy examples of all skills replayed against forgetting. An expert then gains a lot on its own skill
and little elsewhere, and its task vector is small and specific enough that task arithmetic over the three
experts beats every single expert on mean accuracy: the property that the merge search is meant to exploit.

The zoo is ``<cache>/zoo-<hash12>/`` (:mod:`evomerge.zoos.build`); config references ``zoo:base`` and
``zoo:<skill>`` resolve to it (:data:`REFERENCE`).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.merge import merge_state_dicts
from evomerge.models import Reference, save_hf
from evomerge.zoos import skills
from evomerge.zoos.build import (
    MANIFEST,
    build_zoo_folder,
    recipe_hash,
    torch_threads,
    train,
    training_progress,
    zoo_folder,
    zoo_model,
)
from evomerge.zoos.scoring import evaluate

# Bump when the build procedure changes in a way the recipe dict does not capture.
ZOO_VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

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


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over :data:`evomerge.zoos.skills.ALPHABET`; it adds no special tokens."""
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


def model_config() -> dict:
    """config.json's shape keys of every zoo model, known without building the zoo."""
    return {
        "model_type": "llama",
        "vocab_size": len(SPECIAL_TOKENS) + len(skills.ALPHABET),
        **RECIPE["model"],
    }


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


def _batches(
    rows: Iterator[list[int]], batch_size: int, seq_len: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) batches of ``rows``, right-padded; the loss is on every non-pad token."""
    while True:
        batch = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
        for i in range(batch_size):
            row = next(rows)
            batch[i, : len(row)] = torch.tensor(row)
        yield batch, batch.masked_fill(batch == pad_id, -100)


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


# --- building and caching -------------------------------------------------------------------------------


def _build(out: Path, recipe: dict, progress: bool) -> dict:
    """Train and save the whole zoo into ``out``; returns the manifest."""
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    heldout = skills.heldout_prompts()
    base_cfg, exp_cfg = recipe["base"], recipe["expert"]
    seq_len = recipe["seq_len"]

    def fit(model: LlamaForCausalLM, rows: Iterator[list[int]], cfg: dict, on_step) -> None:
        """AdamW with linear warmup then cosine decay to zero; loss on every non-pad token."""
        opt = torch.optim.AdamW(
            model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.98)
        )
        batches = _batches(rows, cfg["batch_size"], seq_len, tokenizer.pad_token_id)
        train(model, batches, opt, cfg["steps"], cfg["warmup"], on_step)
        model.eval()

    accuracy: dict[str, dict[str, float]] = {}
    experts: dict[str, LlamaForCausalLM] = {}
    total = base_cfg["steps"] + exp_cfg["steps"] * len(recipe["skills"])
    # fork_rng: the build seeds torch itself and must not disturb the caller's random state.
    with (
        torch.random.fork_rng(),
        torch_threads(recipe["threads"]),
        training_progress(progress, total) as update,
    ):
        base = build_model(tokenizer, recipe, base_cfg["seed"])
        pick = _base_pick(base_cfg["levels"], base_cfg["skill_weights"])
        fit(
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
            fit(expert, _expert_rows(skill, recipe, heldout, vocab), exp_cfg, on_step)
            save_hf(out / "experts" / skill, expert, tokenizer)
            accuracy[skill] = evaluate(expert, tokenizer, recipe["eval_split"])
            experts[skill] = expert
        # base is saved and evaluated: it takes the reference merge's weights
        base.load_state_dict(
            merge_state_dicts(
                {"base": base, **experts}, "task_arithmetic", base="base", parameters={"weight": 0.5}
            )
        )
        reference = evaluate(base, tokenizer, recipe["eval_split"])
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
    return _complete(zoo_folder("zoo", RECIPE, cache_dir))


def build_zoo(cache_dir: Path | None = None, force: bool = False, progress: bool | str | None = True) -> Path:
    """The zoo folder ``<cache_dir>/zoo-<hash12>/``, built on first use and reused afterwards.

    It holds ``base/`` and ``experts/<skill>/`` (Hugging Face folders with tokenizer) and ``zoo.json``.
    The build happens in a temporary folder renamed into place, so a killed build leaves no zoo behind;
    a folder without ``zoo.json`` (copied half-way, say) is rebuilt, not trusted.
    """
    folder = zoo_folder("zoo", RECIPE, cache_dir)
    return build_zoo_folder(folder, lambda tmp: _build(tmp, RECIPE, progress), force, complete=_complete)


BUILD_NOTICE = "building the tiny model zoo (first use only; about 2 minutes on 2 cores)"

# ``zoo:<name>``. Module functions are looked up when called, so that tests can replace them.
REFERENCE = Reference(
    "zoo",
    names=lambda: model_names(),
    resolve=lambda name, cache_dir, progress: zoo_model(build_zoo(cache_dir, progress=progress), "zoo", name),
    config=lambda name: model_config(),
    notice=lambda cache_dir: None if is_built(cache_dir) else BUILD_NOTICE,
)
