"""What a fitness returns for one model."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FitnessResult:
    """``values``: named numbers (per-task accuracy, ``mean``, or a custom function's outputs).
    ``responses``: per task, item id -> 0/1 correctness of each item evaluated.
    ``n_items``/``n_tokens``: the evaluation's cost in items and forward tokens."""

    values: dict[str, float]
    responses: dict[str, dict[str, float]] = field(default_factory=dict)
    n_items: int = 0
    n_tokens: int = 0
