"""lm-eval tasks as evomerge reads them: found by name, built for one split with their data loaded, and
what each can be scored by (its metrics and filters).

Tasks are named first in evomerge's ``fitness/`` catalogue and the config's ``include`` folders (lm-eval
YAMLs over local files, whose ``data_files`` are resolved next to the YAML), otherwise among lm-eval's own
tasks. ``evomerge check`` and the workers build them the same way (``load_task``), so a task whose name,
split, metric, filter or data is wrong is refused in one line before a run starts.

A task is scored by one :class:`Measure`: a metric it computes, after one of its filters (lm-eval's names:
``exact_match`` after ``flexible-extract`` for GSM8K; ``acc`` after ``none`` for a multiple-choice task).
The default is the task's first metric after its first filter.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from evomerge import catalog
from evomerge.errors import EvomergeError, read_yaml, unknown

# Metrics whose per-item score is 0 or 1: what the IRT estimators, item subsets and adaptive tests take.
BINARY_METRICS = frozenset({"acc", "acc_norm", "acc_mutual_info", "exact_match", "pass_at_1", "pass@1"})
# The filter of a task that declares none (lm-eval's name for it).
NO_FILTER = "none"


@dataclass(frozen=True)
class Measure:
    """How a task is scored: ``metric`` after ``filter`` (None: the task's first of each)."""

    metric: str | None = None
    filter: str | None = None

    def describe(self) -> str:
        return f"{self.metric or 'its first metric'} after {self.filter or 'its first filter'}"


@cache
def catalog_tasks(include: tuple[str, ...] = ()) -> dict[str, Path]:
    """Task name -> YAML path for every lm-eval task YAML in the fitness catalogue and in ``include``
    folders (later folders win)."""
    tasks = {}
    for root in (catalog.catalog_dir("fitness"), *map(Path, include)):
        if not root.is_dir():
            raise EvomergeError(f"fitness include folder {str(root)!r} does not exist")
        for path in _yaml_files(root):
            data = read_yaml(path, "fitness task file")
            if isinstance(data, dict) and isinstance(data.get("task"), str):
                tasks[data["task"]] = path
    return tasks


def _yaml_files(root: Path) -> list[Path]:
    """The .yaml files below ``root``, links to folders not followed (a link back up, as /proc has,
    would make the walk endless)."""
    found = []
    for folder, _, files in os.walk(root, followlinks=False):
        found += [Path(folder) / f for f in files if f.endswith(".yaml")]
    return sorted(found)


def catalog_config(path: Path, split: str) -> dict[str, Any]:
    """The lm-eval config dict of a task YAML, with data paths made absolute and ``split`` as its
    evaluation split."""
    cfg = yaml.safe_load(path.read_text())
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        if split not in files:
            raise EvomergeError(
                f"fitness task {cfg['task']!r} has no split {split!r}; its splits: {', '.join(files)}"
            )
        missing = [str(path.parent / v) for v in files.values() if not (path.parent / v).is_file()]
        if missing:
            raise EvomergeError(
                f"fitness task {cfg['task']!r}: data file {missing[0]!r} (named in {str(path)!r}) does not exist"
            )
        cfg["dataset_kwargs"]["data_files"] = {k: str(path.parent / v) for k, v in files.items()}
    cfg["test_split"] = split
    return cfg


def quiet() -> None:
    """lm-eval, datasets and transformers log at INFO and draw progress bars: not the user's business."""
    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


@cache
def task_manager() -> Any:
    """lm-eval's index of its own tasks (indexing them takes seconds: once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub's host resolves from here (and offline mode is not set): where it does
    not, datasets are read from the local cache alone instead of after a minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    ):
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _offline_unless_reachable() -> Iterator[bool]:
    """datasets and the hub client in offline mode for the duration where the hub cannot be reached."""
    online = hub_reachable()
    if online:
        yield True
        return
    import datasets.config
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _dataset_of(cfg: Mapping[str, Any]) -> str:
    name = cfg.get("dataset_name")
    return f"{cfg.get('dataset_path')}" + (f" ({name})" if name else "")


def _data_error(task: str, cfg: Mapping[str, Any], err: Exception, online: bool) -> EvomergeError:
    path, name = cfg.get("dataset_path"), cfg.get("dataset_name")
    load = f"datasets.load_dataset({path!r}" + (f", {name!r}" if name else "") + ")"
    why = (
        "it is not in the datasets cache and the hub cannot be reached from here"
        if not online
        else f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    )
    return EvomergeError(
        f"fitness task {task!r}: its dataset {_dataset_of(cfg)} cannot be loaded ({why}); make it local: run "
        f'`python -c "import datasets; {load}"` where the hub can be reached and copy the cache '
        "($HF_HOME/datasets) here, or give the task local data files in a task YAML under fitness.include"
    )


def _lm_eval_entry(name: str) -> Any:
    manager = task_manager()
    entry = manager.task_index.get(name)
    if entry is None:
        return None
    kind = getattr(entry.kind, "name", str(entry.kind))
    if kind in ("GROUP", "TAG"):
        raise EvomergeError(
            f"fitness task {name!r} is an lm-eval {kind.lower()}, not a task; name its tasks in fitness.tasks "
            f"(`lm-eval ls tasks` lists them)"
        )
    return entry


def known_task(name: str, include: Sequence[str] = ()) -> None:
    """Refuse a task name that neither the catalogue (with ``include``) nor lm-eval knows."""
    if name in catalog_tasks(tuple(include)):
        return
    quiet()
    if _lm_eval_entry(name) is None:
        raise unknown("fitness task", name, [*catalog_tasks(tuple(include)), "<any lm-eval task>"])


def load_task(name: str, split: str, include: Sequence[str] = ()) -> Any:
    """lm-eval's task object of ``name`` evaluated on ``split``, its data loaded (from the local cache
    alone where the hub cannot be reached); one ``EvomergeError`` line for a task, split or dataset that
    cannot be had here."""
    quiet()
    ours = catalog_tasks(tuple(include))
    if name in ours:
        cfg = catalog_config(ours[name], split)
        from lm_eval.tasks import TaskManager

        try:
            return TaskManager(include_defaults=False).load([cfg])["tasks"][name]
        except Exception as e:
            raise EvomergeError(
                f"fitness task {name!r} ({str(ours[name])!r}) cannot be loaded: "
                f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            ) from None
    entry = _lm_eval_entry(name)
    if entry is None:
        known_task(name, include)  # raises with the names that are known
    cfg = dict(entry.cfg or {})
    with _offline_unless_reachable() as online:
        try:
            task = task_manager().load([name])["tasks"][name]
        except EvomergeError:
            raise
        except Exception as e:
            raise _data_error(name, {**cfg, **_resolved_dataset(entry)}, e, online) from None
    splits = list(getattr(task, "dataset", {}) or {})
    if splits and split not in splits:
        raise EvomergeError(f"fitness task {name!r} has no split {split!r}; its splits: {', '.join(splits)}")
    task.set_config("test_split", split)
    return task


def _resolved_dataset(entry: Any) -> dict[str, Any]:
    """dataset_path / dataset_name of an lm-eval task whose YAML takes them from an ``include``d file."""
    path = getattr(entry, "yaml_path", None)
    if path is None:
        return {}
    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        from lm_eval.tasks._yaml_loader import load_yaml

        cfg = load_yaml(path, resolve_func=False)
        out = {k: cfg[k] for k in ("dataset_path", "dataset_name") if k in cfg}
    return out


def metrics_of(task: Any) -> list[str]:
    """The metrics a task computes per item, in its config's order."""
    return list(task.aggregation())


def filters_of(task: Any) -> list[str]:
    """The filters a task applies to a model's answers before scoring, in its config's order."""
    filters = task.config.filter_list
    if not filters:
        return [NO_FILTER]
    return [f["name"] if isinstance(f, Mapping) else f.name for f in filters]


def resolve_measure(name: str, metrics: Sequence[str], filters: Sequence[str], measure: Measure) -> Measure:
    """``measure`` with the task's defaults (its first metric, its first filter) filled in; an unknown
    metric or filter is refused in one line that lists the task's."""
    for kind, value, allowed in (("metric", measure.metric, metrics), ("filter", measure.filter, filters)):
        if value is not None and value not in allowed:
            close = difflib.get_close_matches(value, list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EvomergeError(
                f"fitness task {name!r} has no {kind} {value!r}{hint}; its {kind}s: {', '.join(allowed)}"
            )
    return Measure(measure.metric or metrics[0], measure.filter or filters[0])


def runs_code(task: Any) -> bool:
    """Whether the task executes what the model writes (lm-eval's unsafe_code: MBPP, HumanEval)."""
    return bool(getattr(task, "UNSAFE_CODE", False))


def check_code_allowed(name: str, runs: bool, allowed: bool) -> None:
    if runs and not allowed:
        raise EvomergeError(
            f"fitness task {name!r} runs the code the model writes; allow it with "
            "fitness.confirm_run_unsafe_code: true"
        )


def higher_is_better(task: Any, metric: str) -> bool:
    return bool(task.higher_is_better().get(metric, True))


def output_type(task: Any) -> str:
    return str(task.config.output_type)


def task_measures(tasks: Sequence[str], objectives: Sequence[Any]) -> dict[str, Measure]:
    """The measure each task is scored by, from the objectives that name a metric or a filter (``of: mean``
    names them for every task, or per task as a mapping); one per task: two objectives scoring one task
    differently are refused."""
    out: dict[str, Measure] = {}
    named_by: dict[str, str] = {}
    for o in objectives:
        metric, filter_ = getattr(o, "metric", None), getattr(o, "filter", None)
        if metric is None and filter_ is None:
            continue
        for key, value in (("metric", metric), ("filter", filter_)):
            if isinstance(value, Mapping):
                if o.of != "mean":
                    raise EvomergeError(
                        f"objective {o.name!r}: {key} is one name for an objective of one task ({o.of!r}); "
                        "a mapping of task -> name is for of: mean"
                    )
                for task in value:
                    if task not in tasks:
                        raise unknown(f"fitness task in objective {o.name!r}'s {key}", task, tasks)
        for task in tasks if o.of == "mean" else [o.of]:
            m = Measure(_for(metric, task), _for(filter_, task))
            if m == Measure():
                continue
            if task in out and out[task] != m:
                raise EvomergeError(
                    f"objectives {named_by[task]!r} and {o.name!r} score fitness task {task!r} differently "
                    f"({out[task].describe()}, {m.describe()}); a run scores each task one way: use one"
                )
            out[task], named_by[task] = m, o.name
    return {t: out.get(t, Measure()) for t in tasks}


def _for(name: str | Mapping[str, str] | None, task: str) -> str | None:
    return name.get(task) if isinstance(name, Mapping) else name
