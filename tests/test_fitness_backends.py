"""Fitness backends: the registry make_fitness dispatches through, and a third backend as one class."""

from __future__ import annotations

from typing import Any

import pytest

from evomerge.config import FitnessConfig, ObjectiveConfig
from evomerge.errors import EvomergeError
from evomerge.fitness import base
from evomerge.fitness.base import FitnessBackend, FitnessResult, fitness_backend, fitness_spec, make_fitness
from evomerge.fitness.lmeval import LmEvalFitness
from evomerge.fitness.python import PythonFitness
from evomerge.registry import Registry

EITHER = "fitness: give either `tasks` (lm-eval task names) or `function` (module:function)"


def test_the_spec_selects_the_backend() -> None:
    """The specs a search hands its workers: ``{"function": f}`` or lm-eval's tasks and options."""
    python = make_fitness(function="math:fsum")
    assert isinstance(python, PythonFitness) and isinstance(python, FitnessBackend)
    lm = make_fitness(tasks=["zoo_addition"], include=[], batch_size=8)
    assert isinstance(lm, LmEvalFitness) and lm.tasks == ["zoo_addition"] and lm.batch_size == 8
    # a whole fitness config section: only the selected backend's fields are passed
    assert isinstance(make_fitness(tasks=(), include=(), batch_size=64, function="math:fsum"), PythonFitness)
    for spec in ({}, {"tasks": ["zoo_addition"], "function": "math:fsum"}, {"function": None}):
        with pytest.raises(EvomergeError) as err:
            make_fitness(**spec)
        assert str(err.value) == EITHER
    with pytest.raises(
        EvomergeError,
        match="unknown field 'tsks'; allowed: apply_chat_template, batch_size, confirm_run_unsafe_code, "
        "fewshot_as_multiturn, function, include, max_gen_toks, max_length, measures, num_fewshot, seed, "
        "system_instruction, tasks",
    ):
        make_fitness(tsks=["zoo_addition"])


def test_the_spec_of_a_config_names_the_selected_backend_fields(tmp_path) -> None:
    lm = FitnessConfig(tasks=("zoo_addition", "zoo_gsm8k"), include=(tmp_path,), batch_size=8)
    objectives = [ObjectiveConfig(name="gsm", of="zoo_gsm8k", filter="flexible-extract")]
    assert fitness_spec(lm, objectives, seed=7) == {
        "tasks": ["zoo_addition", "zoo_gsm8k"],
        "include": [str(tmp_path)],
        "batch_size": 8,
        "max_length": None,
        "num_fewshot": None,
        "max_gen_toks": None,
        "apply_chat_template": False,
        "fewshot_as_multiturn": False,
        "system_instruction": None,
        "confirm_run_unsafe_code": False,
        # what the objectives ask of each task, and the seed that draws few-shot examples
        "measures": {"zoo_addition": [None, None], "zoo_gsm8k": [None, "flexible-extract"]},
        "seed": 7,
    }
    python = FitnessConfig(function="math:fsum", include=(tmp_path,))
    assert fitness_spec(python) == {"function": "math:fsum"}
    assert isinstance(make_fitness(**fitness_spec(lm)), LmEvalFitness)


class Constant:
    """A third backend: every model scores ``constant * scale`` (its constructor takes its fields)."""

    def __init__(self, constant: float, scale: float = 1.0) -> None:
        self.value, self.scale = constant, scale

    def n_items(self, split: str) -> dict[str, int]:
        return {}

    def evaluate(self, model: Any, tokenizer: Any, split: str, items: Any = None) -> FitnessResult:
        return FitnessResult({"score": self.value * self.scale})


def test_a_third_backend_is_one_class_and_its_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    registry: Registry = Registry("fitness backend", base.Backend)
    for name in base.BACKENDS:
        registry.add(name, base.BACKENDS.get(name))
    monkeypatch.setattr(base, "BACKENDS", registry)
    fitness_backend("constant", selected_by="constant", what="a number", options=("scale",))(Constant)
    fitness = make_fitness(constant=2.0, scale=3.0)
    assert isinstance(fitness, Constant) and isinstance(fitness, FitnessBackend)
    assert fitness.evaluate(None, None, "search").values == {"score": 6.0}
    with pytest.raises(EvomergeError) as err:
        make_fitness()
    assert str(err.value) == f"{EITHER} or `constant` (a number)"
    with pytest.raises(ValueError, match="fitness backend 'constant' is already registered"):
        fitness_backend("constant", selected_by="c", what="")(Constant)
