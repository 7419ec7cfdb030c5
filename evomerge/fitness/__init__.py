"""Fitness backends: lm-eval tasks (``LmEvalFitness``) and plain Python functions (``PythonFitness``)."""

from typing import Any

from evomerge.fitness.base import FitnessResult
from evomerge.fitness.lmeval import LmEvalFitness, catalog_tasks, check_tasks
from evomerge.fitness.python import PythonFitness


def make_fitness(
    tasks: Any = (), include: Any = (), batch_size: int = 64, function: Any = None
) -> LmEvalFitness | PythonFitness:
    """The fitness a worker runs: a Python function when given, else lm-eval tasks."""
    if function is not None:
        return PythonFitness(function)
    return LmEvalFitness(list(tasks), batch_size=batch_size, include=list(include))


__all__ = ["FitnessResult", "LmEvalFitness", "PythonFitness", "catalog_tasks", "check_tasks", "make_fitness"]
