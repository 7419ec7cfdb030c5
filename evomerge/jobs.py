"""What flows between the run and its workers: a ``Job`` (a recipe to merge and score on a split) and
an ``EvalResult`` (what a worker says back). Plain data, so Ray can ship them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from evomerge.recipe import Recipe
from evomerge.store import Kind, Status

if TYPE_CHECKING:
    from evomerge.adaptive import AdaptiveScore, AdaptiveSpec


@dataclass(frozen=True)
class Origin:
    """Why an evaluation was asked for: the store fields that say so."""

    kind: Kind
    generation: int | None = None
    label: str | None = None
    genome: list[float] | None = None


@dataclass(frozen=True)
class Job:
    """One evaluation: ``recipe`` on ``split``, on ``items`` (None: all of the split), or, with
    ``adaptive`` (:class:`evomerge.adaptive.AdaptiveSpec` per objective), on the items adaptive tests
    choose, stopped early against ``race`` where given. ``tag`` is the caller's name for it (which
    result answers which job)."""

    tag: Any
    recipe: Recipe
    split: str
    items: dict[str, list[int]] | None = None
    origin: Origin = field(default_factory=lambda: Origin(Kind.SEARCH))
    adaptive: tuple[AdaptiveSpec, ...] | None = None
    race: Any = None

    @cached_property
    def key(self) -> str:
        """The recipe's key: identical weights have one key, and are evaluated once per item subset."""
        return self.recipe.key()

    @cached_property
    def subset(self) -> str | None:
        """A key of the items (None: the whole split): evaluations are reused only on the same items."""
        if self.adaptive:  # the tests' settings (not the race: a raced result stands for later ones)
            return (
                "adaptive-" + hashlib.sha1("".join(s.key() for s in self.adaptive).encode()).hexdigest()[:12]
            )
        if self.items is None:
            return None
        return hashlib.sha1(json.dumps(self.items, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class EvalResult:
    """A worker's answer. ``fatal``: the user's fitness is wrong (every candidate would fail);
    ``timed_out``: the worker hung past the time limit. ``attempts``: evaluations it took."""

    status: Status
    wall_s: float = 0.0
    worker: str | None = None
    error: str | None = None
    trace: str | None = None
    values: dict[str, float] | None = None
    responses: dict[str, dict[str, Any]] | None = None
    n_items: int = 0
    n_tokens: int = 0
    fatal: bool = False
    timed_out: bool = False
    attempts: int = 1
    adaptive: dict[str, AdaptiveScore] | None = None  # per objective, from the worker's adaptive tests
    outputs: dict[str, dict[str, str]] | None = None  # per generative task, item id -> the model's answer

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @classmethod
    def failed(cls, error: str, worker: str | None = None, wall_s: float = 0.0, **kw: Any) -> EvalResult:
        return cls(Status.FAILED, wall_s=wall_s, worker=worker, error=error, **kw)
