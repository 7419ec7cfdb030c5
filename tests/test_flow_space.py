"""The data-flow genes (layer stacking): layout, decoding, the inputs' genomes, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from test_cli import models  # noqa: F401  (base, a, b and a wider 'wide')

from evomerge.cli import app
from evomerge.errors import EvomergeError
from evomerge.recipe import FlowStep, Recipe
from evomerge.searchspace import SearchSpace, load_space_config

EXPERTS = ["a", "b"]


def space(layers: int = 4, **flow) -> SearchSpace:
    data = {"name": "per_layer", "data_flow": flow}
    return SearchSpace(load_space_config(data), EXPERTS, layers)


def alone(layers: int = 4, **flow) -> SearchSpace:
    data = {"name": "per_layer", "parameter_space": False, "data_flow": flow}
    return SearchSpace(load_space_config(data), EXPERTS, layers)


def test_layout_slots_then_scales_after_the_parameter_genes():
    s = space(repeats=3, max_layers=9)
    names = s.describe()
    flow = names[names.index("flow_0/source") :]
    assert flow == [f"flow_{t}/source" for t in range(12)] + [f"flow_{t}/scale" for t in range(12)]
    assert s.n_var == 3 * 2 + 24  # 3 groups x 2 weights, 12 slots, 12 scales
    assert "data flow: 3 x 4 slots over merge, a, b (at most 9 layers) + 12 scale genes" in s.layout()
    assert len(alone(scale=1.0).genes) == 8  # no parameter genes, no scale genes


def test_decode_picks_a_source_per_slot_and_scales_only_transitions():
    s = alone(repeats=2, scale=[0.5, 1.5])
    x = np.zeros(s.n_var)
    # slots 0..7 offer layers 0,1,2,3,0,1,2,3; choices: skip, base, a, b (quarters of [0, 1])
    x[:8] = [0.3, 0.3, 0.6, 0.0, 0.9, 0.9, 0.0, 0.3]
    x[8:] = 0.25  # scale 0.75 wherever a transition happens
    flow = s.decode(x).flow
    assert flow == (
        FlowStep("base", 0, 1.0),
        FlowStep("base", 1, 1.0),
        FlowStep("a", 2, 0.75),  # another model: a transition
        FlowStep("b", 0, 0.75),  # back to layer 0: a transition
        FlowStep("b", 1, 1.0),
        FlowStep("base", 3, 0.75),  # skips layer 2
    )
    assert s.decode(x).depth == 6
    # the groups all decode to the base: data flow alone over fixed models
    assert all(set(g.parameters["weight"].values()) == {0.0} for g in s.decode(x).groups)


def test_max_layers_keeps_the_first_used_slots():
    s = alone(repeats=2, max_layers=3, scale=1.0)
    flow = s.decode(np.full(s.n_var, 0.99)).flow  # every slot offers expert b
    assert [(f.source, f.layer) for f in flow] == [("b", 0), ("b", 1), ("b", 2)]


def test_encode_decode_round_trip_on_random_genomes():
    s = space(repeats=2, scale=[0.25, 2.0])
    rng = np.random.default_rng(0)
    for _ in range(200):
        recipe = s.decode(rng.random(s.n_var))
        assert s.decode(s.encode(recipe)) == recipe


def test_inputs_genomes_pass_through_one_models_layers():
    s = space(repeats=2)
    expert = s.decode(s.expert_genome("a"))
    assert expert.flow == tuple(FlowStep("merge", i) for i in range(4))
    assert all(g.parameters["weight"] == {"a": 1.0, "b": 0.0} for g in expert.groups)
    assert s.decode(s.base_genome()).flow == tuple(FlowStep("merge", i) for i in range(4))
    only = alone(repeats=2)
    assert only.decode(only.expert_genome("b")).flow == tuple(FlowStep("b", i) for i in range(4))
    assert only.decode(only.base_genome()).flow == tuple(FlowStep("base", i) for i in range(4))
    refs = only.reference_recipes()
    assert refs["a"].flow == tuple(FlowStep("merge", i) for i in range(4))  # scored as the candidates
    assert refs["a"].groups[0].parameters["weight"] == {"a": 1.0, "b": 0.0}


def test_inputs_the_space_cannot_express_are_refused_by_name():
    with pytest.raises(EvomergeError, match="max_layers 3 is below the 4 layers of one model"):
        space(max_layers=3).expert_genome("a")
    with pytest.raises(EvomergeError, match=r"layers_from \['b'\] offers neither merge nor a"):
        space(layers_from=["b"]).expert_genome("a")


def test_recipe_with_a_flow_round_trips_and_keys_apart_from_one_without():
    s = space()
    recipe = s.decode(np.random.default_rng(1).random(s.n_var))
    again = Recipe.from_dict(yaml.safe_load(recipe.to_json()))
    assert again == recipe
    assert Recipe(recipe.groups).key() != recipe.key()
    assert "flow" not in Recipe(recipe.groups).to_dict()


@pytest.mark.parametrize(
    ("flow", "message"),
    [
        (
            {"layers_from": ["merge", "c"]},
            "data_flow.layers_from names unknown model 'c'; known: merge, base, a, b",
        ),
        ({"max_layers": 9}, "max_layers is 9 but 2 repeats of the 4 decoder layers give 8 slots"),
        ({"scale": [0.0, 1.0]}, "data_flow.scale [0.0, 1.0] must be positive and finite"),
        ({"scale": -1}, "data_flow.scale -1.0 must be positive"),
        ({"layers_from": ["a", "a"]}, "layers_from names a model twice"),
    ],
)
def test_bad_data_flow_is_one_line(flow, message):
    with pytest.raises(ValueError) as e:  # EvomergeError, or pydantic's error around it
        space(**flow)
    assert message in str(e.value)


def test_a_fixed_merge_with_a_searched_flow():
    """The paper's order: the weights fixed (say, at a merge found before), only the flow searched."""
    data = {
        "name": "per_layer",
        "genes": {},
        "fixed": {"weight": {"a": 0.7, "b": 0.4}},
        "data_flow": {"layers_from": ["merge", "a"], "scale": 1.0},
    }
    s = SearchSpace(load_space_config(data), EXPERTS, 4)
    assert s.describe() == [f"flow_{t}/source" for t in range(8)]
    recipe = s.decode(np.full(s.n_var, 0.4))  # every slot: the merge's layer
    assert all(g.parameters["weight"] == {"a": 0.7, "b": 0.4} for g in recipe.groups)
    assert recipe.flow == tuple(FlowStep("merge", i) for i in range(4)) * 2


def test_merge_is_not_a_source_without_a_parameter_space():
    with pytest.raises(EvomergeError, match=r"unknown model 'merge' \(merge is the candidate's"):
        alone(layers_from=["merge", "a"])
    with pytest.raises(ValueError, match="parameter_space is false and there is no data_flow"):
        load_space_config({"name": "per_layer", "parameter_space": False})


# --- the CLI: one line, exit 2, before anything is stored ---------------------------------------------------


def run_config(tmp_path, models, experts=("a", "b"), **extra):  # noqa: F811  (test_cli's fixture)
    cfg = {
        "models": {"base": str(models["base"]), "experts": {e: str(models[e]) for e in experts}},
        "fitness": {"tasks": ["zoo_addition", "zoo_script"], "items": 5},
        "algorithm": {"name": "ga", "pop_size": 2, "generations": 1},
        "out": str(tmp_path / "run"),
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(path)])
    return result.exit_code, result.stderr.strip()


FLOW = {"name": "per_layer_flow"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"search_space": {**FLOW, "data_flow": {"layers_from": ["merge", "math"]}}},
            "search_space.data_flow.layers_from names unknown model 'math'; known: merge, base, a, b",
        ),
        (
            {"search_space": {**FLOW, "data_flow": {"repeats": 1, "max_layers": 5}}},
            "max_layers is 5 but 1 repeats of the 4 decoder layers give 4 slots, which cannot fill it",
        ),
        (
            {"search_space": {**FLOW, "data_flow": {"repeats": 0}}},
            "config: search_space.data_flow.repeats: Input should be greater than or equal to 1",
        ),
        (
            {"search_space": {**FLOW, "data_flow": {"scale": [0, 2]}}},
            "search_space.data_flow.scale [0.0, 2.0] must be positive and finite",
        ),
        (
            {"objectives": [{"name": "acc"}, {"name": "size", "of": "depth", "direction": "min"}]},
            "objective 'size' is of depth, the decoder layers of a candidate, which only a "
            "search_space.data_flow varies",
        ),
        (
            {
                "search_space": FLOW,
                "objectives": [{"name": "size", "of": "depth", "direction": "min"}],
            },
            "objective 'size' is of depth; add an objective of accuracy to trade it against",
        ),
    ],
)
def test_bad_flow_config_one_line_exit_2(tmp_path, models, extra, message):  # noqa: F811
    code, err = run_config(tmp_path, models, **extra)
    assert code == 2, err
    assert message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_layers_that_cannot_be_chained_are_refused(tmp_path, models):  # noqa: F811
    code, err = run_config(tmp_path, models, experts=("a", "wide"), search_space=FLOW)
    assert code == 2
    assert err == "error: expert 'wide' has tensor shapes that differ from the base: hidden_size 64 vs 32"
