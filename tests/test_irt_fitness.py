"""IRT fitness in a run: calibration, per-objective subsets and estimates, error and cost report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny import demo_irt_config

from evomerge import irt
from evomerge.calibration import Scope, columns
from evomerge.config import load_config, parse_config
from evomerge.errors import EvomergeError
from evomerge.search import Search
from evomerge.searchspace import SearchSpace, SearchSpaceConfig
from evomerge.store import Store

OBJECTIVES = [
    {"name": "mean_accuracy", "of": "mean", "estimator": "gmpirt", "items": 12, "selection": "information"},
    {"name": "script", "of": "zoo_script", "estimator": "sgpirt", "items": 6, "selection": "random"},
]


def irt_config(zoo_dir: Path, out: Path) -> dict:
    return demo_irt_config(zoo_dir, out, OBJECTIVES, {"name": "nsga2", "pop_size": 4, "generations": 2})


@pytest.fixture(scope="module")
def irt_run(zoo_dir, tmp_path_factory):
    ray = pytest.importorskip("ray")
    cfg = parse_config(irt_config(zoo_dir, tmp_path_factory.mktemp("irt") / "run"))
    try:
        yield Search(cfg).run()
    finally:
        ray.shutdown()


def test_calibration_is_stored_and_fitted_per_scope(irt_run):
    store = Store(irt_run / "store.sqlite")
    cal = store.candidates(kind="calibration")
    labels = {c.label for c in cal}  # stored as each finishes, so in any order
    assert labels >= {"base", "addition", "script", "reversal"} and len(cal) == 12
    merges = [c for c in cal if c.label.startswith("random-")]
    assert len(merges) == 8 and all(len(c.genome) == len(merges[0].genome) for c in merges)
    assert all(c.n_items == 600 and c.subset is None for c in cal)
    n_items = {t: 200 for t in ("zoo_addition", "zoo_script", "zoo_reversal")}
    for scope, n in (("mean", 600), ("zoo_script", 200)):
        sc = Scope.load(irt_run / "irt", scope, columns(n_items, scope))
        assert sc.params.n_items == n and sc.endpoint_thetas.shape[0] == 4


def test_search_candidates_are_scored_on_the_subsets_only(irt_run):
    search = Store(irt_run / "store.sqlite").candidates(kind="search")
    assert search and all(c.status == "ok" for c in search)
    for c in search:
        assert c.n_items <= 12 + 6 and c.subset is not None
        assert 0.0 <= c.objectives["mean_accuracy"] <= 1.0 and 0.0 <= c.objectives["script"] <= 1.0


def test_summary_reports_estimator_error_and_cost(irt_run):
    est = json.loads((irt_run / "summary.json").read_text())["estimation"]
    assert set(est["errors"]) == {"mean_accuracy", "script"}
    for e in est["errors"].values():
        assert 0.0 <= e["mae_on_front"] <= 0.5
        assert all(0 <= f["full"] <= 1 for f in e["front"])
    cost = est["cost"]
    assert cost["full_items_per_candidate"] == 600 and cost["item_reduction"] >= 600 / 18
    assert cost["token_reduction"] > 10 and cost["calibration_subjects"] == 12


def test_best_model_is_picked_on_measured_values_only(irt_run):
    """Estimates rank the front; the saved best is the model with the best values measured on the
    whole search split, among the re-scored front and the calibration models (base, experts, merges)."""
    from evomerge.run import Run

    summary = json.loads((irt_run / "summary.json").read_text())
    assert (
        summary["best_picked_on"] == "the whole search split: the re-scored front and the calibration models"
    )
    full = {}
    for name, e in summary["estimation"]["errors"].items():
        for f in e["front"]:
            full.setdefault(f["candidate"], {})[name] = f["full"]
    store = Store(irt_run / "store.sqlite")
    labels = {}
    for c in store.candidates(kind="calibration"):
        full[c.id], labels[c.id] = c.objectives, c.label
    best = max(sorted(full), key=lambda c: sum(full[c].values()))  # earliest on ties
    assert summary["best_candidate"] == best == Run(irt_run).best_id
    assert summary.get("best_label") == labels.get(best)
    assert summary["best"] == store.find(store.get(best).recipe_key, "test").objectives


def test_estimate_matches_the_library_call(irt_run):
    store = Store(irt_run / "store.sqlite")
    c = store.candidates(kind="search")[0]
    n_items = {t: 200 for t in ("zoo_addition", "zoo_script", "zoo_reversal")}
    sc = Scope.load(irt_run / "irt", "zoo_script", columns(n_items, "zoo_script"))
    idx = irt.select_items(sc.params, 6, "random", seed=0)
    y = [c.responses["zoo_script"][sc.cols[i][1]] for i in idx]
    # sgpirt's surrogate: genomes and whole-split accuracy of every calibration model, in calibration
    # order: the base and the experts (at the genomes that reproduce them), then the random merges
    order = ["base", "addition", "script", "reversal"] + [f"random-{i}" for i in range(8)]
    known = sorted(store.candidates(kind="calibration"), key=lambda m: order.index(m.label))
    space = SearchSpace(SearchSpaceConfig(layer_groups=2), order[1:4], 4)  # demo.yaml's space
    assert known[0].genome == pytest.approx(space.base_genome().tolist())
    assert [m.genome for m in known[1:4]] == [
        pytest.approx(space.expert_genome(e).tolist()) for e in order[1:4]
    ]
    acc = [sum(m.responses["zoo_script"].values()) / 200 for m in known]
    surrogate = irt.fit_surrogate([m.genome for m in known], acc, seed=0)
    prior = surrogate.predict(c.genome)
    expected = irt.estimate_accuracy(sc.params, idx, y, "sgpirt", prior=prior)
    assert c.objectives["script"] == pytest.approx(expected)
    gp = irt.estimate_accuracy(sc.params, idx, y, "gpirt")
    assert min(gp, prior[0]) - 1e-9 <= expected <= max(gp, prior[0]) + 1e-9  # a precision-weighted mean


@pytest.mark.parametrize(
    ("objective", "extra", "message"),
    [
        ({"name": "m", "estimator": "gpirt"}, {}, "objective 'm' has estimator 'gpirt' but no `items`"),
        (
            {"name": "m", "estimator": "gpirt", "items": 5},
            {"fitness.items": 10},
            "remove fitness.function / fitness.items",
        ),
        (
            {"name": "m", "estimator": "tinyirt", "items": 5},
            {},
            "objectives.0.estimator: unknown estimator 'tinyirt' (did you mean 'irt'?); "
            "available: gmpirt, gpirt, irt, mean, mpirt, pirt, rcirt, sgpirt",
        ),
        (
            {"name": "m", "estimator": "sgpirt", "items": 5},
            {"fitness.calibration.random_merges": 4},
            "set fitness.calibration.random_merges >= 8 (got 4)",
        ),
    ],
)
def test_bad_estimator_configs(objective, extra, message):
    with pytest.raises(EvomergeError) as err:
        load_config("experiments/demo.yaml", objectives=[objective], **extra)
    assert message in str(err.value)


@pytest.mark.slow  # 90 s: a second IRT run; `python -m pytest -m slow -k calibration_then_resume`
def test_kill_9_during_calibration_then_resume_reproduces_the_run(irt_run, zoo_dir, tmp_path):
    from test_search_engine import _cli, _kill_when, same_run

    run_dir = tmp_path / "killed"
    config = tmp_path / "irt.yaml"
    config.write_text(yaml.safe_dump(irt_config(zoo_dir, run_dir), sort_keys=False))
    _kill_when(_cli("run", config), run_dir / "store.sqlite", "kind = 'calibration'")
    assert not (run_dir / "irt").exists()  # killed before the fit
    resumed = _cli("resume", run_dir)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    same_run(run_dir, irt_run)
