"""Any lm-eval task as fitness: generate_until with the task's filters, multiple choice by any metric,
few-shot prompts fixed per run, chat templates; every score equal to lm-eval's own evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.config import ObjectiveConfig
from evomerge.errors import EvomergeError
from evomerge.fitness.lmeval import LmEvalFitness, check_tasks
from evomerge.fitness.tasks import Measure, load_task, task_measures

pytestmark = pytest.mark.usefixtures("one_thread")

FITNESS_ZOO = Path(__file__).resolve().parents[1] / "fitness" / "zoo"


@pytest.fixture(scope="module")
def addition(zoo_dir):
    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "experts" / "addition").eval()
    return model, AutoTokenizer.from_pretrained(zoo_dir / "base")


def task_copy(root: Path, of: str, task: str, metric_list: list[dict]) -> Path:
    """A task YAML in ``root``: the zoo task ``of`` (its data files by absolute path) renamed ``task`` and
    scored by ``metric_list``."""
    spec = yaml.safe_load((FITNESS_ZOO / f"{of}.yaml").read_text())
    files = spec["dataset_kwargs"]["data_files"]
    spec |= {"task": task, "metric_list": metric_list}
    spec["dataset_kwargs"]["data_files"] = {k: str(FITNESS_ZOO / v) for k, v in files.items()}
    (root / f"{task}.yaml").write_text(yaml.safe_dump(spec))
    return root


@pytest.fixture(scope="module")
def norm_task(tmp_path_factory) -> Path:
    """zoo_addition scored by acc and acc_norm (lm-eval's multiple-choice metrics)."""
    metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]
    return task_copy(tmp_path_factory.mktemp("tasks"), "addition", "zoo_addition_norm", metrics)


def lm_eval_samples(fitness: LmEvalFitness, tasks: list[str], include: tuple[str, ...] = ()) -> dict:
    """lm-eval's own evaluation of the same tasks with the same HFLM: its logged samples per task."""
    from lm_eval.evaluator import evaluate

    loaded = {t: load_task(t, "test", include) for t in tasks}
    out = evaluate(
        fitness._lm, {"tasks": loaded, "groups": {}, "group_map": {}}, bootstrap_iters=0, log_samples=True
    )
    return out["samples"]


def test_generative_and_multiple_choice_scores_equal_lm_evals_own(addition, norm_task) -> None:
    model, tokenizer = addition
    include = (str(norm_task),)
    tasks = ["zoo_gsm8k", "zoo_script_gen", "zoo_addition_norm"]
    for measures in (
        {"zoo_gsm8k": ["exact_match", "strict-match"], "zoo_addition_norm": ["acc", None]},
        {"zoo_gsm8k": [None, "flexible-extract"], "zoo_addition_norm": ["acc_norm", None]},
    ):
        fitness = LmEvalFitness(tasks, include=include, measures=measures, batch_size=32)
        with torch.no_grad():
            ours = fitness.evaluate(model, tokenizer, "test")
        theirs = lm_eval_samples(fitness, tasks, include)
        for task in tasks:
            m = fitness.measure("test")[task]
            ref = {str(s["doc_id"]): float(s[m.metric]) for s in theirs[task] if s["filter"] == m.filter}
            assert ours.responses[task] == ref, (task, m)
            assert ours.values[task] == pytest.approx(sum(ref.values()) / len(ref))
        # what the model wrote: the raw generation, before the filters
        raw = {
            str(s["doc_id"]): s["resps"][0][0] for s in theirs["zoo_gsm8k"] if s["filter"] == "strict-match"
        }
        assert ours.outputs["zoo_gsm8k"] == raw
        assert "zoo_addition_norm" not in ours.outputs
    # the addition expert writes "147" without GSM8K's "#### ": only flexible-extract reads it
    strict = LmEvalFitness(["zoo_gsm8k"]).evaluate(model, tokenizer, "test", {"zoo_gsm8k": list(range(40))})
    flexible = LmEvalFitness(["zoo_gsm8k"], measures={"zoo_gsm8k": [None, "flexible-extract"]}).evaluate(
        model, tokenizer, "test", {"zoo_gsm8k": list(range(40))}
    )
    assert strict.values["zoo_gsm8k"] == 0.0 < 0.4 < flexible.values["zoo_gsm8k"]


def test_generated_tokens_are_counted_and_max_gen_toks_caps_them(addition) -> None:
    model, tokenizer = addition
    items = {"zoo_reversal_gen": list(range(20))}
    full = LmEvalFitness(["zoo_reversal_gen"]).evaluate(model, tokenizer, "search", items)
    capped = LmEvalFitness(["zoo_reversal_gen"], max_gen_toks=1).evaluate(model, tokenizer, "search", items)
    prompts = sum(len(tokenizer(p)["input_ids"]) for p in _prompts("zoo_reversal_gen", "search", range(20)))
    written = sum(len(tokenizer(a)["input_ids"]) for a in full.outputs["zoo_reversal_gen"].values())
    assert full.n_tokens == prompts + written and written >= 40
    assert all(len(a) >= 2 for a in full.outputs["zoo_reversal_gen"].values())
    assert all(len(a) == 1 for a in capped.outputs["zoo_reversal_gen"].values())
    assert capped.n_tokens < full.n_tokens


def _prompts(task: str, split: str, ids) -> list[str]:
    t = load_task(task, split)
    docs = list(t.eval_docs)
    return [t.doc_to_text(docs[i]) for i in ids]


def test_few_shot_prompts_are_fixed_per_run_seed_whatever_the_subset(addition) -> None:
    """Every candidate sees the same prompt for an item, in any subset and order; another seed draws
    other examples."""
    model, tokenizer = addition

    def prompts(seed: int, items: list[int]) -> dict[int, str]:
        fitness = LmEvalFitness(["zoo_addition_gen"], num_fewshot=3, seed=seed)
        fitness.evaluate(model, tokenizer, "search", {"zoo_addition_gen": items})
        return {i: fitness._load("search")["zoo_addition_gen"].requests[i][0].args[0] for i in items}

    one = prompts(0, [5, 6, 7])
    other = prompts(0, [9, 7, 1, 5])
    assert other[5] == one[5] and other[7] == one[7]
    docs = load_task("zoo_addition_gen", "search").eval_docs
    for i, p in one.items():  # three worked examples in the zoo's notation, then the item's prompt
        assert p.count("=") == 4 and p.count(".") == 3 and p.endswith("." + docs[i]["prompt"])
    assert prompts(1, [5, 6, 7]) != one
    # one fitness object: the same prompt on every evaluation
    fitness = LmEvalFitness(["zoo_addition_gen"], num_fewshot=3, seed=0)
    for items in ([5, 6, 7], [7, 5], [6]):
        fitness.evaluate(model, tokenizer, "search", {"zoo_addition_gen": items})
        assert {i: fitness._load("search")["zoo_addition_gen"].requests[i][0].args[0] for i in items} == {
            i: one[i] for i in items
        }


def test_chat_template_and_system_instruction_reach_the_prompt(addition) -> None:
    model, tokenizer = addition
    chat = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    chat.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fitness = LmEvalFitness(
        ["zoo_addition_gen"], apply_chat_template=True, system_instruction="add", num_fewshot=1
    )
    fitness.evaluate(model, chat, "search", {"zoo_addition_gen": [0]})
    prompt = fitness._load("search")["zoo_addition_gen"].requests[0][0].args[0]
    assert prompt.startswith("<system>add<user>") and prompt.endswith("<assistant>")
    multi = LmEvalFitness(
        ["zoo_addition_gen"], apply_chat_template=True, fewshot_as_multiturn=True, num_fewshot=1
    )
    multi.evaluate(model, chat, "search", {"zoo_addition_gen": [0]})
    prompt = multi._load("search")["zoo_addition_gen"].requests[0][0].args[0]
    assert prompt.count("<user>") == 2 and prompt.count("<assistant>") == 2


def O(name: str, of: str, metric=None, filter=None, **kw) -> ObjectiveConfig:  # noqa: E743
    return ObjectiveConfig(name=name, of=of, metric=metric, filter=filter, **kw)


def test_measures_come_from_the_objectives() -> None:
    tasks = ["zoo_gsm8k", "zoo_script_gen"]
    assert task_measures(tasks, [O("m", "mean")]) == {t: Measure() for t in tasks}
    assert task_measures(tasks, [O("m", "mean", "exact_match", {"zoo_gsm8k": "flexible-extract"})]) == {
        "zoo_gsm8k": Measure("exact_match", "flexible-extract"),
        "zoo_script_gen": Measure("exact_match", None),
    }
    with pytest.raises(EvomergeError, match="score fitness task 'zoo_gsm8k' differently"):
        task_measures(tasks, [O("a", "zoo_gsm8k", filter="strict-match"), O("b", "mean", filter="none")])
    with pytest.raises(EvomergeError, match="a mapping of task -> name is for of: mean"):
        task_measures(tasks, [O("a", "zoo_gsm8k", filter={"zoo_gsm8k": "strict-match"})])


def test_check_refuses_what_a_task_cannot_be_scored_by(norm_task) -> None:
    splits = ("search", "test")
    check_tasks(
        ["zoo_gsm8k"], splits=splits, objectives=[O("o", "zoo_gsm8k", "exact_match", "flexible-extract")]
    )
    with pytest.raises(EvomergeError) as err:
        check_tasks(["zoo_gsm8k"], splits=splits, objectives=[O("o", "zoo_gsm8k", "acc")])
    assert str(err.value) == "fitness task 'zoo_gsm8k' has no metric 'acc'; its metrics: exact_match"
    with pytest.raises(EvomergeError) as err:
        check_tasks(["zoo_gsm8k"], splits=splits, objectives=[O("o", "zoo_gsm8k", filter="flexible")])
    assert str(err.value) == (
        "fitness task 'zoo_gsm8k' has no filter 'flexible' (did you mean 'flexible-extract'?); "
        "its filters: strict-match, flexible-extract"
    )
    with pytest.raises(EvomergeError, match="set direction: max"):
        check_tasks(["zoo_gsm8k"], splits=splits, objectives=[O("o", "zoo_gsm8k", direction="min")])
    with pytest.raises(EvomergeError, match="has no split 'validation'; its splits: search, test"):
        check_tasks(["zoo_gsm8k"], splits=("validation",))


# --- bad input: one line, exit 2 at `evomerge check` and `evomerge run`, nothing stored ----------------


def generative_config(tmp_path: Path, fitness: dict | None = None, objective: dict | None = None) -> Path:
    cfg = {
        "models": {"base": "zoo:base", "experts": {"addition": "zoo:addition", "script": "zoo:script"}},
        "fitness": {"tasks": ["zoo_gsm8k", "zoo_script_gen"], "items": 5, **(fitness or {})},
        "objectives": [{"name": "score", "of": "mean", **(objective or {})}],
        "algorithm": {"name": "ga", "pop_size": 2, "generations": 1},
        "out": str(tmp_path / "run"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def bleu_tasks(tmp_path_factory) -> Path:
    """A generative task scored by BLEU, a corpus-level metric: not 0/1 per item."""
    bleu = [{"metric": "bleu", "aggregation": "bleu", "higher_is_better": True}]
    return task_copy(tmp_path_factory.mktemp("bleu"), "script_gen", "zoo_script_bleu", bleu)


@pytest.mark.parametrize(
    ("fitness", "objective", "message"),
    [
        (
            None,
            {"of": "zoo_gsm8k", "metric": "acc"},
            "fitness task 'zoo_gsm8k' has no metric 'acc'; its metrics: exact_match",
        ),
        (
            None,
            {"filter": {"zoo_gsm8k": "flexible_extract"}},
            "fitness task 'zoo_gsm8k' has no filter 'flexible_extract' (did you mean 'flexible-extract'?); "
            "its filters: strict-match, flexible-extract",
        ),
        (
            {"tasks": ["zoo_script_bleu"], "items": None, "include": ["BLEU"]},
            {"estimator": "pirt", "items": 10},
            "objective 'score': estimator 'pirt' needs a 0/1 score per item, and 'zoo_script_bleu' is scored "
            "by bleu; use a 0/1 metric (acc, acc_mutual_info, acc_norm, exact_match, pass@1, pass_at_1) or "
            "remove the estimator",
        ),
        (
            {"tasks": None, "items": None, "function": "fitness_fns:closeness"},
            {"of": "closeness", "metric": "exact_match"},
            "config: objective 'score': metric chooses how an lm-eval task is scored; a fitness function's "
            "objective is a key it returns (of: ...): remove metric",
        ),
        (
            {"max_gen_toks": 0},
            None,
            "config: fitness.max_gen_toks: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            {"fewshot_as_multiturn": True},
            None,
            "config: fitness: fewshot_as_multiturn needs apply_chat_template: true (the turns are chat turns)",
        ),
    ],
)
def test_bad_input_is_refused_at_check_and_run(tmp_path, bleu_tasks, fitness, objective, message) -> None:
    from click.testing import CliRunner

    from evomerge.cli import app

    if fitness and fitness.get("include") == ["BLEU"]:
        fitness = {**fitness, "include": [str(bleu_tasks)]}
    if fitness and fitness.get("tasks") is None:
        fitness = {k: v for k, v in fitness.items() if k != "tasks"}
    config = generative_config(tmp_path, fitness, objective)
    if fitness and "function" in fitness:
        data = yaml.safe_load(config.read_text())
        del data["fitness"]["tasks"]
        config.write_text(yaml.safe_dump(data))
    for command in ("check", "run"):
        result = CliRunner().invoke(app, [command, str(config)])
        assert (result.exit_code, result.stderr.strip()) == (2, f"error: {message}"), command
        assert not (tmp_path / "run").exists()


def test_a_task_whose_data_is_not_here_is_refused_before_a_run_folder_exists(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from evomerge.cli import app
    from evomerge.fitness import tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # what a machine without the hub sees, at once
    tasks.hub_reachable.cache_clear()
    config = generative_config(tmp_path, {"tasks": ["arc_easy", "zoo_script_gen"]})
    try:
        for command in ("check", "run"):
            result = CliRunner().invoke(app, [command, str(config)])
            assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
            assert result.stderr.startswith(
                "error: fitness task 'arc_easy': its dataset allenai/ai2_arc (ARC-Easy) cannot be loaded (it is "
                "not in the datasets cache and the hub cannot be reached from here); make it local: run "
                "`python -c \"import datasets; datasets.load_dataset('allenai/ai2_arc', 'ARC-Easy')\"`"
            )
            assert not (tmp_path / "run").exists()
    finally:
        tasks.hub_reachable.cache_clear()


# --- a generative run: answers stored, shown, reported; a setup that cannot score stores nothing -------


@pytest.fixture(scope="module")
def generative_run(zoo_dir, tmp_path_factory) -> Path:
    """The generative demo at toy size: GA 4 x 2 on 10 items of each task, Ray workers."""
    pytest.importorskip("ray")
    from tiny import toy_run

    return toy_run("demo_generative.yaml", zoo_dir, tmp_path_factory.mktemp("generative") / "run", items=10)


def test_a_generative_run_stores_scores_and_answers(generative_run) -> None:
    from evomerge.run import Run
    from evomerge.store import Store

    store = Store(generative_run / "store.sqlite")
    searched = store.candidates(kind="search")
    assert searched and all(c.status == "ok" for c in searched)
    for c in searched:
        assert set(c.outputs) == set(c.responses) == {"zoo_gsm8k", "zoo_script_gen", "zoo_reversal_gen"}
        assert all(len(r) == 10 and set(r.values()) <= {0.0, 1.0} for r in c.responses.values())
        assert c.objectives["mean_exact_match"] == pytest.approx(
            sum(map(sum, (r.values() for r in c.responses.values()))) / 30
        )
        assert c.n_tokens > sum(len(a) for answers in c.outputs.values() for a in answers.values())
    run = Run(generative_run)
    best = run.best_id
    frame = run.answers(best)
    assert list(frame.columns) == ["task", "item", "prompt", "target", "answer", "score"]
    assert len(frame) == 30 and set(frame.task) == {"zoo_gsm8k", "zoo_script_gen", "zoo_reversal_gen"}
    row = frame[frame.task == "zoo_gsm8k"].iloc[0]
    assert row.target.endswith(f"#### {row.target.split('#### ')[1]}") and row.prompt.endswith("=")
    # the score is lm-eval's: exact match of what was written, read by flexible-extract
    reversal = frame[frame.task == "zoo_reversal_gen"]
    assert ((reversal.answer == reversal.target) == (reversal.score == 1.0)).all()
    assert len(run.answers(best, task="zoo_script_gen", limit=3)) == 3
    test_rows = run.candidates[run.candidates.kind == "reference"]
    assert len(run.answers(int(test_rows.index[0]))) == 600  # the test split: 200 items of each task


def test_show_and_the_report_give_the_answers(generative_run) -> None:
    from click.testing import CliRunner

    from evomerge.cli import app
    from evomerge.report.page import build_report
    from evomerge.run import Run

    run = Run(generative_run)
    best = run.best_id
    out = CliRunner().invoke(app, ["show", str(generative_run), "--candidate", str(best), "--answers", "2"])
    assert out.exit_code == 0, out.output
    assert "answers (the first 2 items of each generative task)" in out.output
    first = run.answers(best, limit=2)
    for _, row in first.iterrows():
        assert row.prompt in out.output and row.task in out.output
    page = build_report(run)
    assert 'id="answers"' in page and "run.answers(" in page


def test_a_worker_that_cannot_load_the_task_data_stores_nothing(zoo_dir, tmp_path) -> None:
    """The data is there at check, gone on the workers: the run ends in one line before its store exists,
    so the same command can run again once the data is back."""
    ray = pytest.importorskip("ray")
    from evomerge.config import load_config
    from evomerge.search import Search

    tasks = tmp_path / "tasks"
    (tasks / "data").mkdir(parents=True)
    spec = yaml.safe_load((FITNESS_ZOO / "script_gen.yaml").read_text())
    spec["task"] = "my_script"
    spec["dataset_kwargs"]["data_files"] = {"search": "data/search.jsonl", "test": "data/test.jsonl"}
    (tasks / "my_script.yaml").write_text(yaml.safe_dump(spec))
    for split in ("search", "test"):
        (tasks / "data" / f"{split}.jsonl").write_text(
            (FITNESS_ZOO / "script" / f"{split}.jsonl").read_text()
        )
    config = generative_config(tmp_path, {"tasks": ["my_script"], "include": [str(tasks)]})
    cfg = load_config(config, **{"zoo.cache_dir": str(zoo_dir.parent)})
    search = Search(cfg)
    (tasks / "data" / "test.jsonl").unlink()
    try:
        with pytest.raises(EvomergeError) as err:
            search.run()
    finally:
        ray.shutdown()
    assert str(err.value) == (
        f"a worker could not prepare: fitness task 'my_script': data file {str(tasks / 'data' / 'test.jsonl')!r} "
        f"(named in {str(tasks / 'my_script.yaml')!r}) does not exist"
    )
    assert not (tmp_path / "run" / "store.sqlite").exists()


@pytest.fixture(scope="module")
def likelihood_tasks(tmp_path_factory) -> Path:
    """The addition items as a loglikelihood task (the answer's likelihood and whether it is greedy, as
    lambada) and as a loglikelihood_rolling task (perplexity of the whole line, as wikitext)."""
    root = tmp_path_factory.mktemp("likelihood")
    files = {k: str(FITNESS_ZOO / "addition" / f"{k}.jsonl") for k in ("search", "test")}
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test"}
    ll = {
        **common,
        "task": "zoo_addition_ll",
        "output_type": "loglikelihood",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{choices[label]}}",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    rolling = {
        **common,
        "task": "zoo_addition_ppl",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{prompt}}{{choices[label]}}",
        "metric_list": [
            {"metric": "word_perplexity"},
            {"metric": "byte_perplexity"},
            {"metric": "bits_per_byte"},
        ],
    }
    (root / "ll.yaml").write_text(yaml.safe_dump(ll))
    (root / "ppl.yaml").write_text(yaml.safe_dump(rolling))
    return root


def test_loglikelihood_and_perplexity_tasks_equal_lm_evals_own(addition, likelihood_tasks) -> None:
    from lm_eval.evaluator import evaluate

    model, tokenizer = addition
    include = (str(likelihood_tasks),)
    tasks = ["zoo_addition_ll", "zoo_addition_ppl"]
    loaded = {t: load_task(t, "test", include) for t in tasks}
    for measures in (
        {"zoo_addition_ll": ["perplexity", None], "zoo_addition_ppl": ["word_perplexity", None]},
        {"zoo_addition_ll": ["acc", None], "zoo_addition_ppl": ["bits_per_byte", None]},
    ):
        fitness = LmEvalFitness(tasks, include=include, measures=measures)
        with torch.no_grad():
            ours = fitness.evaluate(model, tokenizer, "test")
        theirs = evaluate(fitness._lm, {"tasks": loaded, "groups": {}, "group_map": {}}, bootstrap_iters=0)
        for task, (metric, _) in measures.items():
            assert ours.values[task] == pytest.approx(theirs["results"][task][f"{metric},none"], rel=1e-6)
        assert len(ours.responses["zoo_addition_ppl"]) == 200 and not ours.outputs
    # a perplexity item's score is lm-eval's (loglikelihood, words) pair, kept as a list
    assert all(isinstance(v, list) and len(v) == 2 for v in ours.responses["zoo_addition_ppl"].values())
    # perplexity is better lower: an objective that maximises it is refused; an estimator on it too
    with pytest.raises(EvomergeError, match="is better when lower, but direction is max; set direction: min"):
        check_tasks(
            ["zoo_addition_ppl"], include, ("test",), [O("ppl", "zoo_addition_ppl", "word_perplexity")]
        )
    check_tasks(
        ["zoo_addition_ppl"],
        include,
        ("test",),
        [O("ppl", "zoo_addition_ppl", "word_perplexity", direction="min")],
    )
    with pytest.raises(
        EvomergeError, match="needs a 0/1 score per item, and 'zoo_addition_ppl' is scored by"
    ):
        check_tasks(
            ["zoo_addition_ppl"],
            include,
            ("test",),
            [O("ppl", "zoo_addition_ppl", direction="min", estimator="pirt", items=10)],
        )


@pytest.mark.slow
def test_exact_match_feeds_calibration_and_adaptive_tests_as_accuracy_does(zoo_dir, tmp_path) -> None:
    """The generative demo with an IRT estimator and adaptive items: calibration fits on the 0/1 exact
    matches of the base, the experts and random merges; each candidate answers the items its test asks."""
    ray = pytest.importorskip("ray")
    from evomerge.config import parse_config
    from evomerge.search import Search
    from evomerge.store import Store

    data = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "experiments" / "demo_generative.yaml").read_text()
    )
    data["objectives"][0] |= {"estimator": "pirt", "items": "adaptive", "max_items": 12, "target_se": 0.2}
    data["fitness"]["calibration"] = {"random_merges": 4, "items": "all"}
    data |= {
        "algorithm": {"name": "ga", "pop_size": 4, "generations": 1},
        "out": str(tmp_path / "run"),
        "zoo": {"cache_dir": str(zoo_dir.parent)},
    }
    try:
        run_dir = Search(parse_config(data)).run()
    finally:
        ray.shutdown()
    store = Store(run_dir / "store.sqlite")
    calibration = store.candidates(kind="calibration")
    assert len(calibration) == 8 and all(c.n_items == 600 for c in calibration)
    assert (run_dir / "irt" / "mean.json").exists()
    searched = [c for c in store.candidates(kind="search") if c.status == "ok"]
    assert searched
    for c in searched:
        assert c.stopped in ("precise", "max_items", "exhausted") and 0 < c.n_items <= 12
        asked = {(t, i) for t, r in c.responses.items() for i in r}
        assert {(t, i) for t, a in c.outputs.items() for i in a} == asked
        assert all(v in (0.0, 1.0) for r in c.responses.values() for v in r.values())
