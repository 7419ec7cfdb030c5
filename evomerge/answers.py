"""What a candidate wrote: per item of a generative task, the prompt, the target, the model's answer and
its score, side by side. The store keeps the answers (``Candidate.outputs``) and the scores
(``responses``); prompts and targets are read from the task itself (``fitness.tasks.load_task``).

Used by ``Run.answers`` (notebooks), ``evomerge show`` and the report's Answers section.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import pandas as pd

from evomerge.store import Candidate

COLUMNS = ["task", "item", "prompt", "target", "answer", "score"]


@cache
def item_texts(task: str, split: str, include: tuple[str, ...] = ()) -> dict[str, tuple[str, str]]:
    """Item id -> (prompt, target) of ``task`` on ``split``, as lm-eval writes them (no few-shot examples)."""
    from evomerge.fitness.tasks import load_task

    t = load_task(task, split, include)
    out = {}
    for i, doc in enumerate(t.eval_docs):
        target = t.doc_to_target(doc)
        if isinstance(target, int) and t.config.output_type == "multiple_choice":
            target = t.doc_to_choice(doc)[target]
        out[str(i)] = (str(t.doc_to_text(doc)), str(target))
    return out


def answers(
    c: Candidate, include: Sequence[str] = (), tasks: Sequence[str] | None = None, limit: int | None = None
) -> pd.DataFrame:
    """The candidate's answers (``COLUMNS``), per generative task in item order; ``limit`` items per task."""
    rows = []
    for task, written in (c.outputs or {}).items():
        if tasks is not None and task not in tasks:
            continue
        texts = item_texts(task, c.split, tuple(str(p) for p in include))
        scores = (c.responses or {}).get(task, {})
        ids = sorted(written, key=int)[:limit]
        for i in ids:
            prompt, target = texts.get(i, ("", ""))
            rows.append([task, int(i), prompt, target, written[i], _score(scores.get(i))])
    return pd.DataFrame(rows, columns=COLUMNS)


def _score(value: Any) -> Any:
    return value if isinstance(value, (int, float)) else (None if value is None else str(value))
