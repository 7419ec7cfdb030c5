"""The Python fitness backend (``fitness.function``): ``def fitness(model, tokenizer) -> dict[str, float]``.

Referenced from a config as ``fitness.function: "package.module:function"`` (the module must be
importable on every worker: installed, or on ``PYTHONPATH``) or passed to ``evomerge.Search`` as a
callable. It may also return ``(values, responses)`` with ``responses`` as ``{task: {item_id: 0/1}}``,
which the store keeps like lm-eval's per-item results.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.fitness.base import FitnessResult, fitness_backend
from evomerge.fitness.options import PythonOptions

FitnessFn = Callable[[Any, Any], Any]


def load_function(ref: str | FitnessFn) -> FitnessFn:
    """The function named by ``module:function`` (or ``ref`` itself when callable)."""
    if callable(ref):
        return ref
    module, sep, name = ref.partition(":")
    if not sep or not module or not name:
        raise EvomergeError(f"fitness function {ref!r} must be written 'module:function'")
    try:
        imported = importlib.import_module(module)
    except ImportError as e:
        raise EvomergeError(f"fitness function {ref!r} does not import: {e}") from None
    except Exception as e:  # the module's own code failed (SyntaxError, NameError, ...) or a bad name
        first = (str(e).splitlines() or [""])[0]
        raise EvomergeError(
            f"fitness function {ref!r} does not import: {type(e).__name__}: {first}"
        ) from None
    try:
        fn = getattr(imported, name)
    except AttributeError:
        raise EvomergeError(f"fitness function {ref!r}: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise EvomergeError(f"fitness function {ref!r} is not callable")
    return fn


class FitnessOutputError(EvomergeError):
    """The fitness function returned something other than named numbers: fix the function."""


def _check_values(ref: str, values: Any) -> dict[str, float]:
    if not isinstance(values, Mapping) or not values:
        raise FitnessOutputError(
            f"fitness function {ref} must return a non-empty dict of name -> number, got {type(values).__name__}"
        )
    out = {}
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, Real):
            raise FitnessOutputError(
                f"fitness function {ref} returned a non-number for {key!r}: {v!r} ({type(v).__name__})"
            )
        out[str(key)] = float(v)
    return out


def check_function(fitness: Any, objectives: Sequence[Any]) -> None:
    """The function imports (its return values are known only once it runs); objectives name no metric
    or filter (those choose how an lm-eval task is scored)."""
    for o in objectives:
        for key in ("metric", "filter"):
            if getattr(o, key, None) is not None:
                raise EvomergeError(
                    f"objective {o.name!r}: {key} chooses how an lm-eval task is scored; a fitness function's "
                    f"objective is a key it returns (of: ...): remove {key}"
                )
    load_function(fitness.function)


@fitness_backend(
    "python", selected_by="function", what="module:function", options=PythonOptions, check=check_function
)
class PythonFitness:
    """Calls the function on the in-memory merged model; ``split``/``items`` are not used."""

    def __init__(self, function: str | FitnessFn, memory: str | None = None):
        self.memory = memory  # what the memory plan reserves for the function; the function is not told
        self.ref = (
            function if isinstance(function, str) else getattr(function, "__qualname__", repr(function))
        )
        self.fn = load_function(function)

    def n_items(self, split: str) -> dict[str, int]:
        return {}

    def evaluate(self, model: Any, tokenizer: Any, split: str, items: Any = None) -> FitnessResult:
        out = self.fn(model, tokenizer)
        responses: dict[str, dict[str, float]] = {}
        if isinstance(out, tuple) and len(out) == 2:
            out, responses = out
        values = _check_values(self.ref, out)
        n = sum(len(r) for r in responses.values()) if responses else 0
        return FitnessResult(
            values, {t: {str(k): float(v) for k, v in r.items()} for t, r in responses.items()}, n
        )
