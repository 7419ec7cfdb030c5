"""A tiny real run end to end: zoo models, lm-eval fitness, Ray workers, store, front, saved model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.fitness import LmEvalFitness
from evomerge.store import Store

TASKS = ["zoo_addition", "zoo_script", "zoo_reversal"]


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


def test_store_holds_every_candidate(run_dir):
    store = Store(run_dir / "store.sqlite")
    search = store.candidates(kind="search")
    assert 4 <= len(search) <= 8
    assert {c.generation for c in search} == {1, 2}
    for c in search:
        assert c.status == "ok" and c.error is None
        assert set(c.responses) == set(TASKS) and all(len(r) == 20 for r in c.responses.values())
        assert c.n_items == 60 and c.n_tokens > 60 and c.wall_s > 0
        assert len(c.genome) == 9 and c.recipe["groups"][0]["method"] == "task_arithmetic"
        acc = sum(sum(r.values()) for r in c.responses.values()) / 60
        assert c.objectives["mean_accuracy"] == pytest.approx(acc)
    refs = {c.label for c in store.candidates(kind="reference")}
    assert refs == {"base", "addition", "script", "reversal"}
    assert store.last_checkpoint()[0] == 2


def test_front_and_summary(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["objectives"] == ["mean_accuracy"]
    assert set(summary["experts"]) == {"addition", "script", "reversal"}
    front = pd.read_csv(run_dir / "front.csv")
    assert summary["best_candidate"] in set(front["candidate"])
    assert {"search_mean_accuracy", "test_mean_accuracy", "recipe"} <= set(front.columns)


def test_saved_best_model_scores_what_the_store_says(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(run_dir / "best_model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "best_model")
    with torch.no_grad():
        result = LmEvalFitness(TASKS).evaluate(model, tokenizer, "test")
    # the worker scored with 1 thread, this process with more: allow a near-tie item to flip
    assert result.values["mean"] == pytest.approx(summary["best"]["mean_accuracy"], abs=0.01)
    store = Store(run_dir / "store.sqlite")
    test_row = next(
        c for c in store.candidates(kind="test") if c.label == f"front:{summary['best_candidate']}"
    )
    same = sum(test_row.responses[t][i] == v for t in TASKS for i, v in result.responses[t].items())
    assert same >= 0.99 * result.n_items
