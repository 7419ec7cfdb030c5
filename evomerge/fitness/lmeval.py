"""The lm-eval fitness backend (``fitness.tasks``): accuracy on lm-eval tasks, evaluated on the
in-memory model through lm-eval's HFLM.

Tasks are named: first in evomerge's ``fitness/`` catalogue (lm-eval YAMLs over local JSON lines,
whose ``data_files`` are resolved next to the YAML), otherwise among lm-eval's own tasks. The split a
task is evaluated on is set by overriding its ``test_split``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evomerge import catalog
from evomerge.errors import EvomergeError, read_yaml, unknown
from evomerge.fitness.base import FitnessResult, fitness_backend


@cache
def catalog_tasks(include: tuple[str, ...] = ()) -> dict[str, Path]:
    """Task name -> YAML path for every lm-eval task YAML in the fitness catalogue and in ``include``
    folders (later folders win)."""
    tasks = {}
    for root in (catalog.catalog_dir("fitness"), *map(Path, include)):
        if not root.is_dir():
            raise EvomergeError(f"fitness include folder {str(root)!r} does not exist")
        for path in sorted(root.rglob("*.yaml")):
            data = read_yaml(path, "fitness task file")
            if isinstance(data, dict) and isinstance(data.get("task"), str):
                tasks[data["task"]] = path
    return tasks


def task_config(path: Path, split: str) -> dict[str, Any]:
    """The lm-eval config dict of a task YAML, with data paths made absolute and ``split`` as its
    evaluation split."""
    cfg = yaml.safe_load(path.read_text())
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        if split not in files:
            raise EvomergeError(
                f"task {cfg['task']!r} has no split {split!r}; its splits: {', '.join(files)}"
            )
        cfg["dataset_kwargs"]["data_files"] = {k: str(path.parent / v) for k, v in files.items()}
    cfg["test_split"] = split
    return cfg


def _quiet() -> None:
    for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def check_tasks(tasks: Sequence[str], include: Sequence[str] = ()) -> None:
    """Fail early on task names that neither the catalogue nor lm-eval knows."""
    ours = catalog_tasks(tuple(include))
    missing = [t for t in tasks if t not in ours]
    if not missing:
        return
    known = lm_eval_tasks()
    for t in missing:
        if t not in known:
            raise unknown("fitness task", t, [*ours, "<any lm-eval task>"])


@cache
def lm_eval_tasks() -> frozenset[str]:
    """The names of lm-eval's own tasks (indexing them takes seconds: once per process)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def check_objectives(fitness: Any, objectives: Sequence[Any]) -> None:
    """Each objective is of a fitness task or of their ``mean``."""
    for o in objectives:
        if o.of != "mean" and o.of not in fitness.tasks:
            raise EvomergeError(
                f"objective {o.name!r} is of {o.of!r}, which is not a fitness task; "
                f"allowed: mean, {', '.join(fitness.tasks)}"
            )


@fitness_backend(
    "lmeval",
    selected_by="tasks",
    what="lm-eval task names",
    options=("include", "batch_size", "max_length"),
    item_subsets=True,
    check=check_objectives,
)
class LmEvalFitness:
    """Accuracy per task (and their ``mean``) of a model on a fixed item subset of one split."""

    def __init__(
        self,
        tasks: Sequence[str],
        batch_size: int = 64,
        include: Sequence[str] = (),
        max_length: int | None = None,
    ):
        _quiet()
        self.tasks = list(tasks)
        self.catalog = catalog_tasks(tuple(str(p) for p in include))
        self.batch_size = batch_size
        self.max_length = max_length  # None: lm-eval's default, the model's context
        self._task_dicts: dict[str, Any] = {}
        self._lm = None
        self._lm_model = None
        self._tokens: dict[tuple[str, str, int], int] = {}

    def _load(self, split: str) -> Any:
        if split not in self._task_dicts:
            from lm_eval.tasks import TaskManager

            ours = [task_config(self.catalog[t], split) for t in self.tasks if t in self.catalog]
            theirs = [t for t in self.tasks if t not in self.catalog]
            manager = TaskManager(include_defaults=bool(theirs))
            if theirs:
                for t in theirs:
                    cfg = manager.load([t])["tasks"][t].config.to_dict()
                    cfg["test_split"] = split
                    ours.append(cfg)
            self._task_dicts[split] = manager.load(ours)
        return self._task_dicts[split]

    def n_items(self, split: str) -> dict[str, int]:
        tasks = self._load(split)["tasks"]
        return {name: len(task.eval_docs) for name, task in tasks.items()}

    def _hflm(self, model: Any, tokenizer: Any) -> Any:
        if self._lm is None or self._lm_model is not model:
            from lm_eval.models.huggingface import HFLM

            limit = {} if self.max_length is None else {"max_length": self.max_length}
            self._lm = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=self.batch_size,
                device=str(model.device),
                **limit,
            )
            self._lm_model = model
        return self._lm

    def evaluate(
        self, model: Any, tokenizer: Any, split: str, items: dict[str, list[int]] | None = None
    ) -> FitnessResult:
        from lm_eval.evaluator import evaluate

        lm = self._hflm(model, tokenizer)
        loaded = self._load(split)
        tasks = loaded["tasks"]
        if items is not None:  # only the tasks that have items to evaluate
            tasks = {name: task for name, task in tasks.items() if items.get(name)}
            items = {name: ids for name, ids in items.items() if ids}
        out = evaluate(lm, {**loaded, "tasks": tasks}, samples=items, bootstrap_iters=0, log_samples=True)
        values: dict[str, float] = {}
        responses: dict[str, dict[str, float]] = {}
        n_tokens = 0
        evaluated = [t for t in self.tasks if t in tasks]
        for task in evaluated:
            samples = out["samples"][task]
            responses[task] = {str(s["doc_id"]): float(s["acc"]) for s in samples}
            values[task] = float(np.mean(list(responses[task].values())))
            for s in samples:
                n_tokens += self._count_tokens(tokenizer, task, split, s)
        values["mean"] = float(np.mean([values[t] for t in evaluated]))
        return FitnessResult(values, responses, sum(len(r) for r in responses.values()), n_tokens)

    def _count_tokens(self, tokenizer: Any, task: str, split: str, sample: dict[str, Any]) -> int:
        key = (task, split, int(sample["doc_id"]))
        if key not in self._tokens:
            self._tokens[key] = sum(
                len(tokenizer(context + continuation, add_special_tokens=False)["input_ids"])
                for context, continuation in sample["arguments"]
            )
        return self._tokens[key]
