"""What a fitness backend is: the protocol a worker scores models through, what it returns for one
model, and the registry of backends with the options model each brings.

A backend is a class registered with :func:`fitness_backend` and its options: a pydantic model (a
:class:`FitnessOptions`) declaring the fitness config fields it takes, described. The field named by
``selected_by`` picks it (``tasks``: lm-eval, ``function``: a Python function); the run config's
``fitness:`` section is those models' fields beside the common ones (``evomerge.config.fitness_model``).
``fitness_spec(config.fitness)`` is what a worker needs, and ``make_fitness(**spec)`` builds the backend
that spec selects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from evomerge.errors import EvomergeError
from evomerge.registry import Registry


@dataclass
class FitnessResult:
    """``values``: named numbers (per-task score, ``mean``, or a custom function's outputs).
    ``responses``: per task, item id -> the item's score (0/1 for accuracy and exact match).
    ``n_items``/``n_tokens``: the evaluation's cost in items and forward tokens (generated ones included).
    ``outputs``: per generative task, item id -> what the model wrote."""

    values: dict[str, float]
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_items: int = 0
    n_tokens: int = 0
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)


@runtime_checkable
class FitnessBackend(Protocol):
    """Scores one in-memory model: ``evaluate`` on ``split`` (only the item ids in ``items``, per task,
    when given), and ``n_items``: the number of items of each task of ``split`` ({} when it has none)."""

    def evaluate(
        self, model: Any, tokenizer: Any, split: str, items: dict[str, list[int]] | None = None
    ) -> FitnessResult: ...

    def n_items(self, split: str) -> dict[str, int]: ...


class FitnessOptions(BaseModel):
    """The base of a backend's options model: the fitness fields its constructor takes (its
    ``selected_by`` field among them), each a ``Field(description=...)``; the docstring's first line
    heads its table in the configuration reference. Its validators check a config's fitness section."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# (the fitness config section, the objectives) -> None; raises EvomergeError on what it refuses
ConfigCheck = Callable[[Any, Sequence[Any]], None]
# (the fitness config section, the objectives, the run's seed) -> further constructor arguments
ConfigInputs = Callable[[Any, Sequence[Any], int], dict[str, Any]]


@dataclass(frozen=True)
class Backend:
    """A registered backend: its class and its declaration.

    ``selected_by``: the fitness config field whose value (non-empty) selects it, ``what`` says what
    that field holds; ``model``: its options model, whose fields (``selected_by`` and ``options``) are
    passed to the constructor by name.
    ``item_subsets``: it evaluates chosen items of a split and reports per-item responses, which
    ``fitness.items`` and IRT estimators need. ``check(fitness, objectives)``: the checks it needs when
    a config is read (cheap: nothing is loaded). ``inputs(fitness, objectives, seed)``: the constructor
    arguments named ``derived`` that it takes from the rest of the config (what the objectives ask of
    it, the run's seed).
    """

    name: str
    cls: Callable[..., FitnessBackend]
    selected_by: str
    what: str
    model: type[BaseModel]
    item_subsets: bool = False
    check: ConfigCheck | None = field(default=None, repr=False)
    inputs: ConfigInputs | None = field(default=None, repr=False)
    derived: tuple[str, ...] = ()

    @property
    def options(self) -> tuple[str, ...]:
        """The fitness fields besides ``selected_by`` that the constructor takes: its model's."""
        return tuple(f for f in self.model.model_fields if f != self.selected_by)

    @property
    def fields(self) -> tuple[str, ...]:
        """Every fitness field the backend's constructor takes."""
        return (self.selected_by, *self.options)

    def build(self, spec: Mapping[str, Any]) -> FitnessBackend:
        return self.cls(**{k: spec[k] for k in (*self.fields, *self.derived) if k in spec})


# Built-in backends register when evomerge.fitness imports their modules; other packages' through the
# ``evomerge.fitness_backends`` entry points.
BACKENDS: Registry[Backend] = Registry(
    "fitness backend", Backend, providers=("evomerge.fitness",), group="evomerge.fitness_backends"
)


def fitness_backend(
    name: str,
    *,
    selected_by: str,
    what: str,
    options: type[BaseModel],
    item_subsets: bool = False,
    check: ConfigCheck | None = None,
    inputs: ConfigInputs | None = None,
    derived: Sequence[str] = (),
) -> Callable[[type], type]:
    """Register a :class:`FitnessBackend` class under ``name``, with ``options``, the model of the fitness
    fields it takes (a :class:`FitnessOptions`, ``selected_by`` among them); built as
    ``cls(selected_by=value, **options, **inputs(...))``."""
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        raise TypeError(
            f"fitness backend {name!r}: options must be a pydantic model of its fields (a FitnessOptions), "
            f"got {options!r}"
        )
    if selected_by not in options.model_fields:
        raise ValueError(
            f"fitness backend {name!r} is selected by {selected_by!r}, which its options model "
            f"{options.__name__} does not declare; it declares: {', '.join(options.model_fields) or 'nothing'}"
        )

    def register(cls: type) -> type:
        BACKENDS.add(
            name,
            Backend(name, cls, selected_by, what, options, item_subsets, check, inputs, tuple(derived)),
        )
        return cls

    return register


def _selects(value: Any) -> bool:
    return value is not None and not (isinstance(value, (str, tuple, list)) and not value)


def select_backend(spec: Mapping[str, Any]) -> Backend:
    """The one backend whose ``selected_by`` field ``spec`` sets (a fitness config section as a dict,
    or the spec a worker builds its fitness from)."""
    backends = [BACKENDS.get(n) for n in BACKENDS]
    chosen = [b for b in backends if _selects(spec.get(b.selected_by))]
    if len(chosen) != 1:
        raise EvomergeError(
            "fitness: give either " + " or ".join(f"`{b.selected_by}` ({b.what})" for b in backends)
        )
    return chosen[0]


def fitness_spec(fitness: Any, objectives: Sequence[Any] = (), seed: int = 0) -> dict[str, Any]:
    """What a worker needs to build the fitness of a fitness config section: the fields of the backend
    it selects and what it derives from the ``objectives`` and the run's ``seed``, as plain values
    (sequences as lists, paths as strings), for ``make_fitness(**spec)``."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, PurePath) else value

    backend = select_backend(dict(fitness))
    spec = {k: plain(getattr(fitness, k)) for k in backend.fields}
    if backend.inputs is not None:
        spec |= backend.inputs(fitness, objectives, seed)
    return spec


def make_fitness(**spec: Any) -> FitnessBackend:
    """The fitness a worker runs, from a spec of fitness config fields (``{"function": f}`` or
    ``{"tasks": [...], "include": [...], "batch_size": n}``): the backend its fields select."""
    known = {f for n in BACKENDS for b in [BACKENDS.get(n)] for f in (*b.fields, *b.derived)}
    extra = sorted(set(spec) - known)
    if extra:
        raise EvomergeError(
            f"fitness spec has unknown field {extra[0]!r}; allowed: {', '.join(sorted(known))}"
        )
    return select_backend(spec).build(spec)
