"""Fitness backends, one module each, registered in ``BACKENDS`` (see ``base``): lm-eval tasks
(``LmEvalFitness``, ``fitness.tasks``) and plain Python functions (``PythonFitness``, ``fitness.function``).
A third backend is one class in a module imported here, registered with ``@fitness_backend``."""

from evomerge.fitness.base import (
    BACKENDS,
    FitnessBackend,
    FitnessResult,
    fitness_backend,
    fitness_spec,
    make_fitness,
    select_backend,
)
from evomerge.fitness.lmeval import LmEvalFitness, check_tasks
from evomerge.fitness.python import PythonFitness
from evomerge.fitness.tasks import catalog_tasks

__all__ = [
    "BACKENDS",
    "FitnessBackend",
    "FitnessResult",
    "LmEvalFitness",
    "PythonFitness",
    "catalog_tasks",
    "check_tasks",
    "fitness_backend",
    "fitness_spec",
    "make_fitness",
    "select_backend",
]
