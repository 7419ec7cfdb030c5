"""Fitness backends, one module each, registered in ``BACKENDS`` (see ``base``): lm-eval tasks
(``LmEvalFitness``, ``fitness.tasks``) and plain Python functions (``PythonFitness``, ``fitness.function``),
their options models in ``options``. A third backend is one class and its options model (a
``FitnessOptions``), registered with ``@fitness_backend`` in a module imported here or named by an
``evomerge.fitness_backends`` entry point."""

from evomerge.fitness.base import (
    BACKENDS,
    FitnessBackend,
    FitnessOptions,
    FitnessResult,
    fitness_backend,
    fitness_spec,
    make_fitness,
    select_backend,
)
from evomerge.fitness.lmeval import LmEvalFitness, check_tasks
from evomerge.fitness.options import LmEvalOptions, PythonOptions
from evomerge.fitness.python import PythonFitness
from evomerge.fitness.tasks import catalog_tasks

__all__ = [
    "BACKENDS",
    "FitnessBackend",
    "FitnessOptions",
    "FitnessResult",
    "LmEvalFitness",
    "LmEvalOptions",
    "PythonFitness",
    "PythonOptions",
    "catalog_tasks",
    "check_tasks",
    "fitness_backend",
    "fitness_spec",
    "make_fitness",
    "select_backend",
]
