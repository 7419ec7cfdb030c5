"""Adaptive items in a run: calibration, the held-out check, each candidate scored by adaptive tests
on the tiny zoo through lm-eval, racing against the previous generations' best, the history table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import demo_irt_config

from evomerge.config import parse_config
from evomerge.errors import EvomergeError
from evomerge.run import load_run
from evomerge.search import Search
from evomerge.store import Store

pytestmark = pytest.mark.slow  # a calibration and a search with lm-eval: over a minute on 2 cores


def adaptive_config(zoo_dir: Path, out: Path, **objective) -> dict:
    adaptive = {"name": "mean_accuracy", "of": "mean", "estimator": "pirt", "items": "adaptive", **objective}
    return demo_irt_config(zoo_dir, out, [adaptive], {"name": "ga", "pop_size": 4, "generations": 3})


@pytest.fixture(scope="module")
def adaptive_run(zoo_dir, tmp_path_factory):
    ray = pytest.importorskip("ray")
    out = tmp_path_factory.mktemp("adaptive") / "run"
    cfg = parse_config(adaptive_config(zoo_dir, out, max_items=40, target_se=0.04, race=True))
    try:
        yield Search(cfg).run()
    finally:
        ray.shutdown()


def test_candidates_are_scored_on_the_items_their_tests_chose(adaptive_run):
    store = Store(adaptive_run / "store.sqlite")
    searched = [c for c in store.candidates(kind="search") if c.status == "ok"]
    assert searched and all(c.subset.startswith("adaptive-") for c in searched)
    assert all(4 <= c.n_items <= 40 and c.n_items % 4 == 0 for c in searched)
    assert all(c.stopped in ("precise", "max_items", "raced") for c in searched)
    assert all(0 < c.metrics["mean_accuracy_se"] < 0.5 for c in searched)
    asked = [sum(len(v) for v in c.responses.values()) for c in searched]
    assert asked == [c.n_items for c in searched]
    check = json.loads((adaptive_run / "irt" / "mean.adaptive.json").read_text())["check"]
    assert check["mae_mix"] <= min(check["mae_irt"], check["mae_mean"]) + 1e-12 and check["subjects"] == 12


def test_raced_candidates_never_reach_the_front_and_the_history_counts_them(adaptive_run):
    run = load_run(adaptive_run)
    front = run.pareto_front()
    assert (front.stopped != "raced").all()
    h = run.history
    assert list(h.columns[:5]) == ["generation", "evaluated", "failed", "items_per_candidate", "raced"]
    assert (h.items_per_candidate <= 40).all() and h.raced.iloc[0] == 0  # nothing to race in generation 1


def test_max_items_over_the_split_is_refused_before_calibration(zoo_dir, tmp_path):
    pytest.importorskip("ray")
    cfg = parse_config(adaptive_config(zoo_dir, tmp_path / "run", max_items=601))
    with pytest.raises(
        EvomergeError, match=r"^objective 'mean_accuracy': max_items=601 exceeds the 600 items of 'mean'$"
    ):
        Search(cfg).run()
    assert not Store(tmp_path / "run" / "store.sqlite").candidates(kind="calibration")
