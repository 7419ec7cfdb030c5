"""plugin_constant: a fitness backend registered from outside evomerge, with its own options model."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from evomerge.fitness import FitnessOptions, FitnessResult, fitness_backend


class ConstantOptions(FitnessOptions):
    """Every model scores one number (a plugin's backend)."""

    plugin_constant: float | None = Field(None, description="the score every model gets")
    plugin_scale: float = Field(1.0, gt=0, description="what the score is multiplied by")


@fitness_backend("plugin_constant", selected_by="plugin_constant", what="a number", options=ConstantOptions)
class ConstantFitness:
    """score = plugin_constant * plugin_scale, whatever the model."""

    def __init__(self, plugin_constant: float, plugin_scale: float = 1.0) -> None:
        self.score = plugin_constant * plugin_scale

    def n_items(self, split: str) -> dict[str, int]:
        return {}

    def evaluate(self, model: Any, tokenizer: Any, split: str, items: Any = None) -> FitnessResult:
        return FitnessResult({"score": self.score})
