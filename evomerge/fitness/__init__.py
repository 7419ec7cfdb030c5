"""Fitness backends: lm-eval tasks (``LmEvalFitness``) and plain Python functions."""

from evomerge.fitness.base import FitnessResult
from evomerge.fitness.lmeval import LmEvalFitness, catalog_tasks, check_tasks

__all__ = ["FitnessResult", "LmEvalFitness", "catalog_tasks", "check_tasks"]
