"""The lm-eval fitness backend (``fitness.tasks``): any lm-eval task, scored on the in-memory model.

Every output type is served: multiple choice and loglikelihood (one forward per choice), generate_until
(batched greedy generation with the task's ``until`` and ``max_gen_toks``, then the task's filters) and
loglikelihood_rolling (perplexity). Each task is scored by one measure (``tasks.Measure``): a metric after
a filter, named by the objectives. Per item the backend returns the metric's score, and for a generative
task what the model wrote.

The evaluation is lm-eval's own parts (the task's prompts, its requests, HFLM's batched loglikelihood and
generation, the task's filters and metrics) in evomerge's order: the requests of a split are built once
per worker, each item's few-shot examples drawn with a seed of (run seed, item id), so every candidate
and every item subset sees the same prompt for an item, and a candidate's requests of all tasks go to the
model together, batched by request type.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.fitness.base import FitnessResult, fitness_backend
from evomerge.fitness.options import LmEvalOptions
from evomerge.fitness.tasks import (
    BINARY_METRICS,
    Measure,
    catalog_tasks,
    check_code_allowed,
    filters_of,
    higher_is_better,
    known_task,
    load_task,
    metrics_of,
    output_type,
    quiet,
    resolve_measure,
    runs_code,
    task_measures,
)
from evomerge.plan import DEFAULT_BATCH

GENERATIVE = "generate_until"


def check_objectives(fitness: Any, objectives: Sequence[Any]) -> None:
    """Each objective is of a fitness task or of their ``mean``; a task is scored one way (cheap: nothing
    is loaded; ``check_tasks`` checks the metrics and data)."""
    for o in objectives:
        if o.of != "mean" and o.of not in fitness.tasks:
            raise EvomergeError(
                f"objective {o.name!r} is of {o.of!r}, which is not a fitness task; "
                f"allowed: mean, {', '.join(fitness.tasks)}"
            )
    task_measures(fitness.tasks, objectives)


def fitness_inputs(fitness: Any, objectives: Sequence[Any], seed: int) -> dict[str, Any]:
    """What the backend takes from the rest of the config: each task's measure, and the run's seed, which
    draws the few-shot examples."""
    measures = task_measures(fitness.tasks, objectives)
    return {"measures": {t: [m.metric, m.filter] for t, m in measures.items()}, "seed": seed}


@dataclass(frozen=True)
class TaskFacts:
    """What checking a config needs of a task on one split, read once per process."""

    metrics: tuple[str, ...]
    filters: tuple[str, ...]
    higher_is_better: dict[str, bool]
    unsafe: bool


def task_facts(name: str, split: str, include: Sequence[str] = ()) -> TaskFacts:
    """The task built for ``split`` with its data loaded (``tasks.load_task``, which refuses what cannot
    be had here), reduced to what a check reads; kept per process while the task's YAML is unchanged."""
    path = catalog_tasks(tuple(include)).get(name)
    return _task_facts(name, split, tuple(include), path.stat().st_mtime_ns if path else None)


@lru_cache(maxsize=256)
def _task_facts(name: str, split: str, include: tuple[str, ...], _stamp: int | None) -> TaskFacts:
    task = load_task(name, split, include)
    metrics = tuple(task.aggregation())
    better = {m: higher_is_better(task, m) for m in metrics}
    return TaskFacts(metrics, tuple(filters_of(task)), better, runs_code(task))


def check_tasks(
    tasks: Sequence[str],
    include: Sequence[str] = (),
    splits: Sequence[str] = (),
    objectives: Sequence[Any] = (),
    options: Mapping[str, Any] | None = None,
) -> None:
    """What a run needs of its tasks, before it starts: every name known; for each split, the task built
    with its data loaded (``tasks.load_task``); each task's measure among its metrics and filters, in the
    objectives' direction; an estimator only on a 0/1 metric; a task that runs code only when allowed."""
    for t in tasks:
        known_task(t, include)
    options = dict(options or {})
    measures = task_measures(tasks, objectives)
    for split in splits:
        for name in tasks:
            facts = task_facts(name, split, include)
            measure = resolve_measure(name, facts.metrics, facts.filters, measures[name])
            _check_task(name, facts, measure, objectives, options)


def _check_task(
    name: str, facts: TaskFacts, measure: Measure, objectives: Sequence[Any], options: Mapping[str, Any]
) -> None:
    check_code_allowed(name, facts.unsafe, bool(options.get("confirm_run_unsafe_code")))
    for o in objectives:
        if o.of not in (name, "mean"):
            continue
        if o.estimator and measure.metric not in BINARY_METRICS:
            raise EvomergeError(
                f"objective {o.name!r}: estimator {o.estimator!r} needs a 0/1 score per item, and "
                f"{name!r} is scored by {measure.metric}; use a 0/1 metric ({', '.join(sorted(BINARY_METRICS))}) "
                "or remove the estimator"
            )
        better = facts.higher_is_better.get(measure.metric, True)
        if o.of == name and (o.direction == "max") != better:
            want = "max" if better else "min"
            raise EvomergeError(
                f"objective {o.name!r}: {name!r}'s {measure.metric} is better when "
                f"{'higher' if better else 'lower'}, but direction is {o.direction}; set direction: {want}"
            )


@dataclass
class _Split:
    """One task on one split, as a worker keeps it: the task, its docs, the measure it is scored by and
    each item's requests, built on first use and reused by every later evaluation."""

    task: Any
    measure: Measure
    docs: list[dict[str, Any]]
    requests: dict[int, list[Any]] = field(default_factory=dict)
    context_tokens: dict[int, int] = field(default_factory=dict)


@fitness_backend(
    "lmeval",
    selected_by="tasks",
    what="lm-eval task names",
    options=LmEvalOptions,
    item_subsets=True,
    check=check_objectives,
    inputs=fitness_inputs,
    derived=("measures", "seed"),
)
class LmEvalFitness:
    """Per task the value of its measure (and their ``mean``) on all items of a split or a subset."""

    def __init__(
        self,
        tasks: Sequence[str],
        batch_size: int | None = None,
        include: Sequence[str] = (),
        max_length: int | None = None,
        num_fewshot: int | None = None,
        max_gen_toks: int | None = None,
        apply_chat_template: bool = False,
        fewshot_as_multiturn: bool = False,
        system_instruction: str | None = None,
        confirm_run_unsafe_code: bool = False,
        measures: Mapping[str, Sequence[str | None]] | None = None,
        seed: int = 0,
    ):
        quiet()
        self.tasks = list(tasks)
        self.include = tuple(str(p) for p in include)
        catalog_tasks(self.include)  # an include folder that is not there: refused before any split loads
        self.batch_size = batch_size or DEFAULT_BATCH  # a run passes the memory plan's batch
        self.max_length = max_length  # None: lm-eval's default, the model's context
        self.num_fewshot = num_fewshot  # None: each task's own
        self.max_gen_toks = max_gen_toks  # None: each task's own (lm-eval's default 256)
        self.chat = {
            "apply_chat_template": apply_chat_template,
            "fewshot_as_multiturn": fewshot_as_multiturn,
            "system_instruction": system_instruction,
        }
        self.confirm_run_unsafe_code = confirm_run_unsafe_code
        self.measures = {t: Measure(*(measures or {}).get(t, (None, None))) for t in self.tasks}
        self.seed = seed
        self._splits: dict[str, dict[str, _Split]] = {}
        self._lm = None
        self._lm_model = None

    # --- tasks ------------------------------------------------------------------------------------------
    def _load(self, split: str) -> dict[str, _Split]:
        if split not in self._splits:
            loaded = {}
            for name in self.tasks:
                task = load_task(name, split, self.include)
                measure = resolve_measure(name, metrics_of(task), filters_of(task), self.measures[name])
                check_code_allowed(name, runs_code(task), self.confirm_run_unsafe_code)
                if self.num_fewshot is not None:
                    task.set_config("num_fewshot", self.num_fewshot)
                if self.max_gen_toks is not None and output_type(task) == GENERATIVE:
                    kwargs = dict(task.config.generation_kwargs or {})
                    task.set_config("generation_kwargs", {**kwargs, "max_gen_toks": self.max_gen_toks})
                loaded[name] = _Split(task, measure, list(task.eval_docs))
            self._splits[split] = loaded
        return self._splits[split]

    def n_items(self, split: str) -> dict[str, int]:
        return {name: len(s.docs) for name, s in self._load(split).items()}

    def measure(self, split: str) -> dict[str, Measure]:
        """The measure each task is scored by, its defaults resolved."""
        return {name: s.measure for name, s in self._load(split).items()}

    # --- the model ---------------------------------------------------------------------------------------
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

    def _requests(self, name: str, s: _Split, doc_id: int, lm: Any) -> list[Any]:
        """An item's requests, built once: its prompt with few-shot examples drawn by (seed, item)."""
        if doc_id not in s.requests:
            task, doc = s.task, s.docs[doc_id]
            task.set_fewshot_seed(random.Random(f"{self.seed}:{name}:{doc_id}").randrange(2**32))
            chat = self.chat["apply_chat_template"]
            extra = {"gen_prefix": task.doc_to_prefix(doc)} if hasattr(task, "doc_to_prefix") else {}
            ctx = task.fewshot_context(
                doc,
                num_fewshot=task.config.num_fewshot or 0,
                chat_template=lm.apply_chat_template if chat else None,
                **self.chat,
                **extra,
            )
            made = task.construct_requests(
                doc=doc,
                ctx=ctx,
                metadata=(task.config.task, doc_id, task.config.repeats),
                apply_chat_template=chat,
                chat_template=lm.apply_chat_template if chat else None,
            )
            s.requests[doc_id] = made if isinstance(made, list) else [made]
        return s.requests[doc_id]

    def evaluate(
        self, model: Any, tokenizer: Any, split: str, items: dict[str, list[int]] | None = None
    ) -> FitnessResult:
        lm = self._hflm(model, tokenizer)
        loaded = self._load(split)
        chosen = {
            name: list(range(len(s.docs))) if items is None else [int(i) for i in items.get(name, [])]
            for name, s in loaded.items()
        }
        chosen = {name: ids for name, ids in chosen.items() if ids}
        self._answer(lm, {name: (loaded[name], ids) for name, ids in chosen.items()})
        result = FitnessResult({})
        for name, ids in chosen.items():
            self._score(name, loaded[name], ids, tokenizer, result)
        if result.values:
            result.values["mean"] = sum(result.values.values()) / len(result.values)
        result.n_items = sum(len(ids) for ids in chosen.values())
        return result

    def _answer(self, lm: Any, chosen: dict[str, tuple[_Split, list[int]]]) -> None:
        """The model's answers to the chosen items' requests (in ``req.resps``): every task's requests of
        one type in one call, which HFLM sorts by length and batches."""
        by_type: dict[str, list[Any]] = defaultdict(list)
        for name, (s, ids) in chosen.items():
            for i in ids:
                for req in self._requests(name, s, i, lm):
                    req.resps, req.filtered_resps = [], {}
                    by_type[req.request_type].extend([req] * req.repeats)
        for request_type, reqs in by_type.items():
            for req, out in zip(reqs, getattr(lm, request_type)(reqs, disable_tqdm=True), strict=True):
                req.resps.append(out)

    def _score(self, name: str, s: _Split, ids: list[int], tokenizer: Any, result: FitnessResult) -> None:
        """One task's items scored as lm-eval scores them (its filter, then its metric per item, then the
        metric's aggregation) into ``result``, with what the model wrote and the tokens it cost."""
        reqs = {i: s.requests[i] for i in ids}
        ensemble = next(f for f in s.task._filters if f.name == s.measure.filter)
        ensemble.apply([r for i in ids for r in reqs[i]])
        scores = {}
        for i in ids:
            answers = [r.filtered_resps[s.measure.filter] for r in reqs[i]]
            scores[str(i)] = s.task.process_results(s.docs[i], answers)[s.measure.metric]
            result.n_tokens += self._tokens(s, i, tokenizer)
        result.responses[name] = {i: _plain(v) for i, v in scores.items()}
        result.values[name] = float(s.task.aggregation()[s.measure.metric](list(scores.values())))
        if output_type(s.task) == GENERATIVE:
            result.outputs[name] = {str(i): str(reqs[i][0].resps[0]) for i in ids}
            result.n_tokens += sum(_count(tokenizer, text) for text in result.outputs[name].values())

    def _tokens(self, s: _Split, doc_id: int, tokenizer: Any) -> int:
        """Forward tokens of an item's prompts (and continuations): counted once per item and split.
        A generative item's generated tokens are added per evaluation."""
        if doc_id not in s.context_tokens:
            total = 0
            for req in s.requests[doc_id]:
                args = req.args
                if req.request_type == GENERATIVE:
                    total += _count(tokenizer, args[0])
                else:  # (context, continuation), or (text,) for loglikelihood_rolling
                    total += _count(tokenizer, "".join(a for a in args if isinstance(a, str)))
            s.context_tokens[doc_id] = total
        return s.context_tokens[doc_id]


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _plain(score: Any) -> Any:
    """A per-item score as the store keeps it: a number (a perplexity item's (loglikelihood, words) pair
    as a list)."""
    if isinstance(score, bool):
        return float(score)
    if isinstance(score, (int, float)):
        return float(score)
    if isinstance(score, (tuple, list)):
        return [_plain(v) for v in score]
    try:
        return float(score)
    except (TypeError, ValueError):
        return str(score)


__all__ = ["LmEvalFitness", "check_tasks"]
