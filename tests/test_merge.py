"""Merge methods and the Merger: math against mergekit, in-place writes, and bad input."""

from __future__ import annotations

import pytest
import torch
from tiny import random_models

from evomerge.errors import EvomergeError
from evomerge.merge import METHODS, Merger
from evomerge.recipe import GroupRecipe, Recipe


@pytest.fixture(scope="module")
def state_dicts():
    return [m.state_dict() for m in random_models(3)]


@pytest.fixture(scope="module")
def merger(state_dicts):
    base, a, b = state_dicts
    return Merger(base, {"a": a, "b": b})


def mergekit_merge(state_dicts, method, params):
    api = pytest.importorskip(
        "mergekit.merge_methods.api", reason="mergekit not installed (pip install mergekit)"
    )
    base, a, b = state_dicts
    if method == "linear":
        weight = {"a": params["weight"][0], "b": params["weight"][1]}
        models = {"a": a, "b": b}
        if params.get("base_weight"):
            models = {"base": base, **models}
            weight["base"] = params["base_weight"]
        shared = {k: v for k, v in params.items() if k not in ("weight", "base_weight")}
        return api.merge_state_dicts(models, "linear", parameters={"weight": weight, **shared})
    mk = {k: ({"a": v[0], "b": v[1]} if isinstance(v, list) else v) for k, v in params.items()}
    return api.merge_state_dicts({"base": base, "a": a, "b": b}, method, base="base", parameters=mk)


CASES = [
    ("linear", {"weight": [0.6, 0.3]}),
    ("linear", {"weight": [0.6, 0.3], "base_weight": 0.2}),
    ("linear", {"weight": [1.5, -0.5], "normalize": False}),
    ("task_arithmetic", {"weight": [0.6, 0.3]}),
    ("task_arithmetic", {"weight": [0.7, 0.9], "normalize": True, "lambda": 0.5}),
    ("ties", {"weight": [0.6, 0.3], "density": [0.5, 0.7]}),
    ("ties", {"weight": [1.0, -0.3], "density": [0.13, 0.99], "lambda": 0.8, "normalize": False}),
    ("ties", {"weight": [0.5, 0.5]}),
]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_matches_mergekit(state_dicts, merger, method, params):
    ours = merger.merge(method, params)
    theirs = mergekit_merge(state_dicts, method, params)
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert torch.isfinite(ours[name]).all()
        assert (ours[name] - t).abs().max().item() <= 1e-6, name


def test_per_layer_recipe_matches_mergekit_per_group(state_dicts, merger):
    groups = (
        GroupRecipe(
            "layers_0-1", "ties", {"weight": {"a": 0.8, "b": 0.2}, "density": {"a": 0.3, "b": 0.9}}, (0, 2)
        ),
        GroupRecipe("layers_2-3", "task_arithmetic", {"weight": {"a": 0.1, "b": 0.9}}, (2, 4)),
        GroupRecipe("other", "linear", {"weight": {"a": 0.4, "b": 0.6}}),
    )
    ours = merger.apply(Recipe(groups))
    expected = {
        "layers_0-1": mergekit_merge(state_dicts, "ties", {"weight": [0.8, 0.2], "density": [0.3, 0.9]}),
        "layers_2-3": mergekit_merge(state_dicts, "task_arithmetic", {"weight": [0.1, 0.9]}),
        "other": mergekit_merge(state_dicts, "linear", {"weight": [0.4, 0.6]}),
    }
    recipe = Recipe(groups)
    for name, t in ours.items():
        group = recipe.group_for(name).name
        assert (t - expected[group][name]).abs().max().item() <= 1e-6, name
    assert {recipe.group_for(n).name for n in ours} == {"layers_0-1", "layers_2-3", "other"}


def test_reference_recipes_reproduce_inputs(state_dicts, merger):
    base, a, _ = state_dicts
    assert all(torch.equal(t, base[n]) for n, t in merger.merge("task_arithmetic", {"weight": 0.0}).items())
    # an expert is rebuilt as base + task vector: equal up to float32 rounding
    only_a = merger.merge("linear", {"weight": {"a": 1.0, "b": 0.0}})
    assert all(torch.allclose(t, a[n], rtol=0, atol=1e-6) for n, t in only_a.items())


def test_apply_writes_into_model_in_place(merger):
    (model,) = random_models(1, seed=5)
    ptrs = {n: p.data_ptr() for n, p in model.state_dict().items()}
    merged = merger.merge("task_arithmetic", {"weight": 0.5}, out=model)
    for n, p in model.state_dict().items():
        assert p.data_ptr() == ptrs[n]
        assert torch.equal(p, merged[n])


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("tie", {"weight": 1.0}, "unknown merge method 'tie' (did you mean 'ties'?)"),
        ("ties", {}, "merge method 'ties' needs parameter 'weight'"),
        ("ties", {"weight": 1.0, "density": 1.5}, "parameter 'density'=1.5 is outside [0.0, 1.0]"),
        ("ties", {"weight": 1.0, "gamma": 0.1}, "merge method 'ties' has no parameter 'gamma'"),
        ("ties", {"weight": [1.0]}, "1 values given, expected one per expert (2)"),
        ("linear", {"weight": 1.0, "normalize": 3}, "parameter 'normalize' must be true or false"),
    ],
)
def test_bad_parameters_name_method_and_parameter(merger, method, params, message):
    with pytest.raises(EvomergeError) as err:
        merger.merge(method, params)
    assert message in str(err.value)


def test_shape_mismatch_names_the_tensor(state_dicts):
    base, a, _ = state_dicts
    (wide,) = random_models(1, hidden=64)
    with pytest.raises(EvomergeError, match=r"expert 'wide' tensor 'model.embed_tokens.weight' has shape"):
        Merger(base, {"a": a, "wide": wide.state_dict()})


def test_registry_declares_parameters():
    assert {"linear", "task_arithmetic", "ties"} <= set(METHODS.names())
    ties = METHODS.get("ties")
    assert [p.name for p in ties.params] == ["weight", "density", "normalize", "lambda", "int8_mask"]
    assert ties.param("density").default == 1.0
