"""Fitness backends: the registry make_fitness dispatches through, and a third backend as one class."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field, field_validator

from evomerge.config import ObjectiveConfig, fitness_model, parse_config
from evomerge.errors import EvomergeError
from evomerge.fitness import base
from evomerge.fitness.base import (
    FitnessBackend,
    FitnessOptions,
    FitnessResult,
    fitness_backend,
    fitness_spec,
    make_fitness,
)
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
        "fewshot_as_multiturn, function, include, max_gen_toks, max_length, measures, memory, num_fewshot, "
        "seed, system_instruction, tasks",
    ):
        make_fitness(tsks=["zoo_addition"])


def test_the_spec_of_a_config_names_the_selected_backend_fields(tmp_path) -> None:
    lm = fitness_model()(tasks=("zoo_addition", "zoo_gsm8k"), include=(tmp_path,), batch_size=8)
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
    python = fitness_model()(function="math:fsum", include=(tmp_path,))
    assert fitness_spec(python) == {"function": "math:fsum", "memory": None}
    assert isinstance(make_fitness(**fitness_spec(lm)), LmEvalFitness)


class ConstantOptions(FitnessOptions):
    """A constant score."""

    constant: float | None = Field(None, description="the score of every model")
    scale: float = Field(1.0, gt=0, description="what the constant is multiplied by")


class Constant:
    """A third backend: every model scores ``constant * scale`` (its constructor takes its fields)."""

    def __init__(self, constant: float, scale: float = 1.0) -> None:
        self.value, self.scale = constant, scale

    def n_items(self, split: str) -> dict[str, int]:
        return {}

    def evaluate(self, model: Any, tokenizer: Any, split: str, items: Any = None) -> FitnessResult:
        return FitnessResult({"score": self.value * self.scale})


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """A copy of the backends' registry that a test may add to."""
    registry: Registry = Registry("fitness backend", base.Backend)
    for name in base.BACKENDS:
        registry.add(name, base.BACKENDS.get(name))
    monkeypatch.setattr(base, "BACKENDS", registry)
    return registry


def test_a_third_backend_is_one_class_and_its_registration(registry: Registry) -> None:
    fitness_backend("constant", selected_by="constant", what="a number", options=ConstantOptions)(Constant)
    assert registry.get("constant").options == ("scale",)
    fitness = make_fitness(constant=2.0, scale=3.0)
    assert isinstance(fitness, Constant) and isinstance(fitness, FitnessBackend)
    assert fitness.evaluate(None, None, "search").values == {"score": 6.0}
    with pytest.raises(EvomergeError) as err:
        make_fitness()
    assert str(err.value) == f"{EITHER} or `constant` (a number)"
    with pytest.raises(ValueError, match="fitness backend 'constant' is already registered"):
        fitness_backend("constant", selected_by="constant", what="", options=ConstantOptions)(Constant)
    with pytest.raises(ValueError, match="selected by 'c', which its options model ConstantOptions does not"):
        fitness_backend("c", selected_by="c", what="", options=ConstantOptions)(Constant)
    with pytest.raises(TypeError, match="options must be a pydantic model"):
        fitness_backend("c", selected_by="c", what="", options=("c",))(Constant)  # type: ignore[arg-type]


def test_a_config_takes_a_backends_options_from_its_model(registry: Registry) -> None:
    """The fitness section is the common fields beside every backend's options: a run config selects the
    new backend and sets its option with no edit to evomerge, and the option's declaration checks it."""
    fitness_backend("constant", selected_by="constant", what="a number", options=ConstantOptions)(Constant)
    config = {
        "models": {"base": "zoo:base", "experts": {"a": "zoo:addition"}},
        "fitness": {"constant": 0.5, "scale": 4},
        "objectives": [{"name": "score", "of": "score"}],
    }
    cfg = parse_config(config)
    assert (cfg.fitness.constant, cfg.fitness.scale, cfg.fitness.tasks) == (0.5, 4.0, ())
    assert fitness_spec(cfg.fitness) == {"constant": 0.5, "scale": 4.0}
    assert parse_config(cfg.model_dump(mode="json")) == cfg  # as a run stores it and reads it back
    with pytest.raises(EvomergeError) as err:
        parse_config({**config, "fitness": {"constant": 0.5, "scale": 0}})
    assert str(err.value) == "config: fitness.scale: Input should be greater than 0 (got 0)"
    with pytest.raises(EvomergeError) as err:
        parse_config({**config, "fitness": {"constant": 0.5, "scael": 2}})
    assert str(err.value).startswith("config: unknown key 'fitness.scael'; allowed: tasks, include, ")
    assert "constant, scale, search_split" in str(err.value)


class Batches(FitnessOptions):
    """Another meaning of lm-eval's batch_size."""

    batches: tuple[str, ...] = Field((), description="named batches")
    batch_size: str = Field("small", description="a size by name")


class Sizes(FitnessOptions):
    """A validator named as the Python backend's is."""

    sizes: tuple[str, ...] = Field((), description="sizes")

    @field_validator("sizes")
    @classmethod
    def _a_size(cls, v: Any) -> Any:
        return v


def test_two_meanings_of_one_option_are_refused(registry: Registry) -> None:
    """One name in the flat fitness section means one thing: a second type of it, or a validator that
    would hide another backend's, is refused when the section is composed."""
    fitness_backend("batches", selected_by="batches", what="batches", options=Batches)(Constant)
    with pytest.raises(EvomergeError) as err:
        parse_config({"models": {"base": "zoo:base", "experts": {"a": "zoo:a"}}, "fitness": {"tasks": ["t"]}})
    assert str(err.value) == (
        "config: fitness: fitness backend 'batches' declares fitness option 'batch_size' as str = 'small', "
        "and fitness backend 'lmeval' as int | None = None; one name, one meaning: rename one"
    )
    registry._entries.pop("batches")
    fitness_backend("sizes", selected_by="sizes", what="sizes", options=Sizes)(Constant)
    with pytest.raises(
        EvomergeError,
        match="fitness backend 'sizes'.s options model and fitness backend "
        "'python' both have a validator named '_a_size'; one would hide the other",
    ):
        fitness_model()
