"""A data-flow search end to end: workers materialize flows, depth is an objective, the run resumes,
and a stored flow re-merges into an ordinary model that scores what the store says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fitness_fns import through_the_layers
from test_search_engine import models, ray_env, write_config  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM

from evomerge.config import load_config
from evomerge.recipe import FlowStep, Recipe
from evomerge.report.page import refresher
from evomerge.run import Run
from evomerge.search import Search, resume_search
from evomerge.store import Store
from evomerge.workers import Worker

OBJECTIVES = [{"name": "level", "of": "level"}, {"name": "size", "of": "depth", "direction": "min"}]


def flow_recipe(experts: list[str]) -> Recipe:
    """Half a merge of the experts, its layer 1 used twice with a scale, an expert's layer in between."""
    recipe = Recipe.uniform("task_arithmetic", {"weight": dict.fromkeys(experts, 0.5)})
    steps = [
        FlowStep("merge", 0),
        FlowStep("merge", 1),
        FlowStep(experts[0], 2, 0.8),
        FlowStep("merge", 1, 1.3),
    ]
    return Recipe(recipe.groups, (*steps, FlowStep("merge", 2, 1.0), FlowStep("base", 3, 0.9)))


def test_a_worker_scores_a_flow_and_saves_a_model_that_scores_the_same(models, tmp_path):  # noqa: F811
    experts = ["a", "b"]
    worker = Worker(
        {"base": str(models["base"]), "experts": {e: str(models[e]) for e in experts}},
        {"function": "fitness_fns:through_the_layers"},
    )
    recipe = flow_recipe(experts)
    from evomerge.jobs import Job, Origin
    from evomerge.store import Kind

    result = worker.evaluate(Job(0, recipe, "search", None, Origin(Kind.SEARCH)))
    assert result.ok, result.error
    assert result.values["depth"] == 6.0
    assert set(worker.held) == {"a", "base"}  # the merge is the worker's own model
    before = {k: v.clone() for k, v in worker.model.state_dict().items()}
    saved = worker.save(recipe, str(tmp_path / "flow"))
    loaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    assert loaded.config.num_hidden_layers == 6
    again = through_the_layers(loaded, None)
    for key in ("level", "spread"):
        assert again[key] == pytest.approx(result.values[key], rel=1e-5)
    # the worker's model is the merge again afterwards, untouched by the flow
    assert all(torch.equal(before[k], v) for k, v in worker.model.state_dict().items())


@pytest.mark.slow
def test_a_flow_search_with_depth_resumes_and_reloads(tmp_path, models, ray_env):  # noqa: F811
    """PS + DFS with depth to minimise: drop the last two generations (as a crash would), resume, and
    get the same front; the best candidate re-merges (Run.load_model) to an ordinary model of its depth
    whose fitness equals the stored value."""
    cfg = load_config(
        write_config(tmp_path, models, "fitness_fns:through_the_layers", objectives=OBJECTIVES),
        out=str(tmp_path / "run"),
        **{"search_space": {"name": "per_layer_flow"}, "algorithm.pop_size": 6, "algorithm.generations": 3},
    )
    run = Search(cfg, refresh=refresher()).run()
    store = Store(run / "store.sqlite")
    rows = store.candidates(kind="search")
    assert {len(c.recipe["flow"]) for c in rows if c.status == "ok"} > {4}  # the depth varies
    summary = json.loads((run / "summary.json").read_text())
    store.db.execute("DELETE FROM candidates WHERE generation >= 2 OR kind != 'search'")
    store.db.execute("DELETE FROM checkpoints WHERE generation > 1")
    store.close()
    (run / "summary.json").unlink()
    resume_search(run, refresh=refresher()).resume()  # the report: the CLI's refresh
    after = Store(run / "store.sqlite").candidates(kind="search")
    assert {c.recipe_key for c in after} == {c.recipe_key for c in rows}
    assert json.loads((run / "summary.json").read_text())["front"] == summary["front"]

    r = Run(run)
    front = r.pareto_front()
    assert (front["depth"] == front["size"]).all()
    best = r.candidates.loc[r.best_id]
    model, _ = r.load_model(r.best_id)
    assert model.config.num_hidden_layers == best["depth"] == len(best["recipe"]["flow"])
    assert through_the_layers(model, None)["level"] == pytest.approx(best["level"], rel=1e-5)
    assert r.plot_front() is not None
    assert Path(run / "front.csv").read_text().splitlines()[0].split(",")[-2] == "depth"
    page = (run / "report.html").read_text()  # written by the run: the flows of the best and the front
    assert "Data flow" in page and 'id="flow-0"' in page
