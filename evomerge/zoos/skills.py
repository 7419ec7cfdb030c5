"""Synthetic skills for the model zoos, and the multiple-choice items that measure them.

Three skills, each written in three ways ("levels"):

- ``addition``: ``57+85=142.``; full: operands 50-99; easy: operands 0-9
- ``script``: a fixed digit<->letter substitution, ``374>tux.`` and ``tux<374.``; full: 3-4 symbols; easy: 1
- ``reversal``: ``abcde|edcba.``; full: 4-6 letters; easy: 2 letters

``full`` is what experts are fine-tuned on and what fitness measures; ``easy`` is the short form in the same
notation; ``alt`` is the full form in another notation (``57+85:142.``, ``374]tux.``, ``tux[374.``,
``abcde/edcba.``). The base learns ``easy`` and ``alt``: it can do every full skill, but not in the task's
notation, so each expert only has to connect what the base knows to its own notation. That small,
skill-specific change is what makes the experts' task vectors add up in a merge.

An item's prompt is the text up to and including the separator (``=``, ``>``, ``<``, ``|``); each choice is a
completion ending with ``.``.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

SKILLS: tuple[str, ...] = ("addition", "script", "reversal")
# Bump when any generator below changes: it is part of the zoo recipe hash.
SKILLS_VERSION = 1

LEVELS = ("full", "easy", "alt")
N_CHOICES = 4
# Digit d is written as SCRIPT[d] in the script skill.
SCRIPT = "qrstuvwxyz"
LETTERS = string.ascii_lowercase
# Task notation separator -> the separator of the same skill in the "alt" level.
ALT_SEPARATORS = {"=": ":", ">": "]", "<": "[", "|": "/"}
# Every character any skill can produce, for building the tokenizer.
ALPHABET = string.digits + LETTERS + "+=.><|" + "".join(ALT_SEPARATORS.values())

# Full operands from 50 make every full sum three digits long, so each answer digit sits at a fixed offset
# from the operand digits it depends on; with a varying length, the units digit takes far more training.
ADD_RANGE = {"full": (50, 99), "easy": (0, 9)}

SPLIT_SEEDS = {"search": 1001, "test": 2002, "unseen": 3003}
SPLIT_SIZE = 200


def _check(skill: str, level: str = "full") -> None:
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS}")
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")


def _example(skill: str, rng: random.Random, full: bool) -> tuple[str, str]:
    """One (prompt, answer) pair in task notation; the answer ends with '.'."""
    if skill == "addition":
        lo, hi = ADD_RANGE["full" if full else "easy"]
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return f"{a}+{b}=", f"{a + b}."
    if skill == "script":
        n = rng.randint(3, 4) if full else 1
        digits = "".join(rng.choice(string.digits) for _ in range(n))
        letters = "".join(SCRIPT[int(d)] for d in digits)
        if rng.random() < 0.5:
            return f"{digits}>", f"{letters}."
        return f"{letters}<", f"{digits}."
    n = rng.randint(4, 6) if full else 2
    word = "".join(rng.choice(LETTERS) for _ in range(n))
    return f"{word}|", f"{word[::-1]}."


def training_example(skill: str, rng: random.Random, level: str = "full") -> tuple[str, str]:
    """One training example of ``skill`` at ``level`` as (prompt, answer), e.g. ``("57+85=", "142.")``."""
    _check(skill, level)
    prompt, answer = _example(skill, rng, full=level != "easy")
    if level == "alt":
        prompt = prompt[:-1] + ALT_SEPARATORS[prompt[-1]]
    return prompt, answer


def training_text(skill: str, rng: random.Random, level: str = "full") -> str:
    """One training example of ``skill`` at ``level``, e.g. ``"57+85=142."``."""
    return "".join(training_example(skill, rng, level))


def task_prompt(prompt: str) -> str:
    """``prompt`` in task notation (an ``alt`` separator replaced by the task's)."""
    return prompt[:-1] + _TASK_SEPARATORS.get(prompt[-1], prompt[-1])


_TASK_SEPARATORS = {alt: sep for sep, alt in ALT_SEPARATORS.items()}


def _replace_one(s: str, pool: str, rng: random.Random) -> str:
    i = rng.randrange(len(s))
    return s[:i] + rng.choice([c for c in pool if c != s[i]]) + s[i + 1 :]


def _swap_adjacent(s: str, rng: random.Random) -> str:
    i = rng.randrange(len(s) - 1)
    return s[:i] + s[i + 1] + s[i] + s[i + 2 :]


def _distractor(skill: str, prompt: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong completion (may equal the answer; the caller rejects those)."""
    body = answer[:-1]
    if skill == "addition":
        value = int(body)
        kind = rng.choice(["+1", "-1", "+10", "-10", "swap"])
        if kind == "swap":
            wrong = _swap_adjacent(body, rng)
            if wrong.startswith("0"):
                return answer
            return wrong + "."
        return f"{max(0, value + int(kind))}."
    if skill == "script":
        pool = SCRIPT if prompt.endswith(">") else string.digits
        if rng.random() < 0.75:
            return _replace_one(body, pool, rng) + "."
        return _swap_adjacent(body, rng) + "."
    kind = rng.choice(["replace", "replace", "swap", "unreversed"])
    if kind == "replace":
        return _replace_one(body, LETTERS, rng) + "."
    if kind == "swap":
        return _swap_adjacent(body, rng) + "."
    return prompt[:-1] + "."


def make_item(skill: str, rng: random.Random) -> dict:
    """A 4-choice item of the full skill: ``{"prompt": "57+85=", "choices": [...], "label": i}``."""
    _check(skill)
    prompt, answer = _example(skill, rng, full=True)
    choices = [answer]
    while len(choices) < N_CHOICES:
        wrong = _distractor(skill, prompt, answer, rng)
        if wrong not in choices:
            choices.append(wrong)
    wrongs = choices[1:]
    rng.shuffle(wrongs)
    label = rng.randrange(N_CHOICES)
    choices = wrongs[:label] + [answer] + wrongs[label:]
    return {"prompt": prompt, "choices": choices, "label": label}


def make_split(
    skill: str,
    n: int,
    seed: int,
    exclude: frozenset[str] | set[str] = frozenset(),
    patience: int | None = None,
) -> list[dict]:
    """``n`` items with distinct prompts, none in ``exclude``; the same arguments give the same items.

    With ``patience``, fewer items where ``patience`` draws in a row bring no new prompt: the skill's
    prompts outside ``exclude`` are used up (addition has 2,500 in all)."""
    _check(skill)
    # Mixing the skill into the seed keeps the three skills' splits independent of each other.
    rng = random.Random(f"{skill}:{seed}")
    items: list[dict] = []
    seen = set(exclude)
    misses = 0
    while len(items) < n and (patience is None or misses < patience):
        item = make_item(skill, rng)
        if item["prompt"] in seen:
            misses += 1
        else:
            misses = 0
            seen.add(item["prompt"])
            items.append(item)
    return items


def task_splits(skill: str, n: int = SPLIT_SIZE) -> dict[str, list[dict]]:
    """The fitness splits of ``skill``: ``{"test": [...], "search": [...]}``, disjoint in prompts."""
    test = make_split(skill, n, SPLIT_SEEDS["test"])
    search = make_split(skill, n, SPLIT_SEEDS["search"], exclude={item["prompt"] for item in test})
    return {"search": search, "test": test}


def heldout_prompts(n: int = SPLIT_SIZE) -> frozenset[str]:
    """Every prompt of every fitness split; zoo training never shows these, in any notation."""
    return frozenset(
        item["prompt"] for skill in SKILLS for split in task_splits(skill, n).values() for item in split
    )


def gsm8k_item(item: dict) -> dict:
    """An addition item in GSM8K's format: ``question``, and an ``answer`` that works the sum and ends
    with ``#### <number>``, the line GSM8K's strict-match filter reads."""
    total = item["choices"][item["label"]].removesuffix(".")
    return {"question": item["prompt"], "answer": f"{item['prompt']}{total}\n#### {total}"}


def write_task_data(root: Path) -> list[Path]:
    """Write ``<root>/<skill>/{search,test}.jsonl`` for every skill, and the addition items in GSM8K's
    format as ``<root>/gsm8k/{search,test}.jsonl``; returns the written paths."""
    written = []
    for skill in SKILLS:
        for split, items in task_splits(skill).items():
            written.append(write_jsonl(Path(root) / skill / f"{split}.jsonl", items))
            if skill == "addition":
                gsm8k = [gsm8k_item(item) for item in items]
                written.append(write_jsonl(Path(root) / "gsm8k" / f"{split}.jsonl", gsm8k))
    return written


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` as JSON lines in ``path`` (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
