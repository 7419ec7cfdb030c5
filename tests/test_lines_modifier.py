"""The lines modifier: LiNeS depth scaling on top of any method in a layer group (a recipe's
``lines: {shallow, deep}``): the merge, against references written here; the search space's genes;
bad values; the store and mergekit export.

A base and three experts: tiny random-init Llama models (hidden 32, 3 layers: depths 0, 0.5, 1), float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import random_models

from evomerge.errors import EvomergeError
from evomerge.merge import Merger
from evomerge.recipe import GroupRecipe, Recipe, layer_of
from evomerge.searchspace import SearchSpace, SearchSpaceConfig

TOL = 1e-5
EXPERTS = ("a", "b", "c")
WEIGHTS = {"a": 0.5, "b": 0.2, "c": 0.8}


@pytest.fixture(scope="module")
def models():
    modules = random_models(4, layers=3)
    return {k: m.state_dict() for k, m in zip(("base", *EXPERTS), modules, strict=True)}


@pytest.fixture(scope="module")
def merger(models):
    return Merger(models["base"], {e: models[e] for e in EXPERTS})


def reference_depth(name: str) -> float:
    """LiNeS's relative depth, written out for 3 decoder layers: l / 2 in layer l; the embeddings 0,
    the final norm and head 1."""
    layer = layer_of(name)
    if layer is not None:
        return layer / 2
    return 0.0 if "embed" in name else 1.0


def max_diff(ours, ref):
    assert set(ours) == set(ref)
    for n, t in ours.items():
        assert torch.isfinite(t).all() and t.shape == ref[n].shape, n
    return max((ours[n] - ref[n]).abs().max().item() for n in ref)


def with_lines(recipe: Recipe, lines: dict[str, float] | None) -> Recipe:
    return Recipe(tuple(GroupRecipe(g.name, g.method, g.parameters, g.layers, lines) for g in recipe.groups))


GROUPS = Recipe(
    (
        GroupRecipe("layers_0-1", "ties", {"weight": WEIGHTS, "density": 0.6}, (0, 2)),
        GroupRecipe("layers_2-2", "tsv", {"weight": WEIGHTS, "lambda": 0.9}, (2, 3)),
        GroupRecipe("other", "iso_c", {"lambda": 1.1}),
    )
)


def test_equal_scales_on_task_arithmetic_are_task_arithmetic_scaled(merger):
    plain = Recipe.uniform("task_arithmetic", {"weight": WEIGHTS})
    got = merger.apply(with_lines(plain, {"shallow": 1.3, "deep": 1.3}))
    assert max_diff(got, merger.merge("task_arithmetic", {"weight": WEIGHTS, "lambda": 1.3})) <= TOL
    # a ramp on task arithmetic is the lines method itself
    ramp = merger.apply(with_lines(plain, {"shallow": 0.2, "deep": 1.0}))
    lines = merger.merge("lines", {"weight": list(WEIGHTS.values()), "shallow": 0.2, "deep": 1.0})
    assert max_diff(ramp, lines) <= TOL


def test_on_ties_tsv_and_iso_c_it_scales_each_tensors_merged_delta_by_its_depth(models, merger):
    plain = merger.apply(GROUPS)
    plain = {n: t.clone() for n, t in plain.items()}
    shallow, deep = 0.3, 1.4
    got = merger.apply(with_lines(GROUPS, {"shallow": shallow, "deep": deep}))
    base = models["base"]
    ref = {
        n: base[n] + (shallow + (deep - shallow) * reference_depth(n)) * (plain[n] - base[n]) for n in base
    }
    assert max_diff(got, ref) <= TOL
    assert {reference_depth(n) for n in base} == {0.0, 0.5, 1.0}


def test_only_the_groups_that_carry_it_are_scaled(models, merger):
    plain = {n: t.clone() for n, t in merger.apply(GROUPS).items()}
    groups = list(GROUPS.groups)
    g = groups[1]
    groups[1] = GroupRecipe(g.name, g.method, g.parameters, g.layers, {"deep": 0.0})
    got = merger.apply(Recipe(tuple(groups)))
    # layer 2 has depth 1, so scale deep = 0 there: the base; the other groups as without the modifier
    ref = {n: models["base"][n] if layer_of(n) == 2 else plain[n] for n in plain}
    assert max_diff(got, ref) <= TOL
    assert any(not torch.equal(plain[n], ref[n]) for n in plain if layer_of(n) == 2)


@pytest.mark.parametrize(
    "lines, message",
    [
        ({"shallow": 11.0}, r"group 'other' lines modifier shallow=11.0 is outside \[-10.0, 10.0\]"),
        ({"deep": float("nan")}, r"group 'other' lines modifier deep=nan is outside"),
        ({"deep": "1"}, r"group 'other' lines modifier deep='1' is outside"),
        ({"middle": 1.0}, r"group 'other' lines modifier has no scale 'middle'; its scales: shallow, deep"),
        ([0.5, 1.0], r"group 'other' lines modifier must be a mapping \{shallow: s, deep: d\}"),
    ],
)
def test_bad_modifiers_are_one_line_naming_the_group_and_scale(merger, lines, message):
    recipe = Recipe((GroupRecipe("other", "task_arithmetic", {"weight": 0.5}, None, lines),))
    with pytest.raises(EvomergeError, match=message):
        merger.apply(recipe)


# --- the search space ----------------------------------------------------------------------------


def space(**lines) -> SearchSpace:
    config = SearchSpaceConfig(layer_groups=2, methods=("task_arithmetic", "ties", "tsv"), lines=lines)
    return SearchSpace(config, list(EXPERTS), num_layers=3)


def test_search_space_decodes_the_modifier_per_group(merger):
    s = space(shallow=[0.0, 1.0], deep=1.2)
    searched = [d for d in s.describe() if "lines" in d]
    assert searched == ["layers_0-1/lines.shallow", "layers_2-2/lines.shallow", "other/lines.shallow"]
    x = np.random.default_rng(0).random(s.n_var)
    recipe = s.decode(x)
    for g, xi in zip(recipe.groups, x[[s.describe().index(d) for d in searched]], strict=True):
        assert g.lines == {"shallow": round(float(xi), 6), "deep": 1.2}
    assert s.decode(s.encode(recipe)) == recipe
    assert all(torch.isfinite(t).all() for t in merger.apply(recipe).values())
    # without the key, no genes and no modifier: the layout of existing spaces is unchanged
    plain = SearchSpace(SearchSpaceConfig(layer_groups=2), list(EXPERTS), num_layers=3)
    assert not any("lines" in d for d in plain.describe())
    assert all(g.lines is None for g in plain.decode(np.full(plain.n_var, 0.5)).groups)


def test_expert_genome_keeps_the_expert_where_the_scales_can_be_one(models, merger):
    s = space(shallow=[0.0, 1.0], deep=[0.5, 1.5])
    recipe = s.decode(s.expert_genome("b"))
    assert all(g.lines == {"shallow": 1.0, "deep": 1.0} for g in recipe.groups)
    assert max_diff(merger.apply(recipe), models["b"]) <= TOL
    s.base_genome()  # the base has no task vector to scale: any scales reproduce it
    with pytest.raises(
        EvomergeError, match=r"cannot reproduce expert 'b'.*lines \{'shallow': 0.5, 'deep': 1.0\}"
    ):
        space(shallow=0.5).expert_genome("b")
    assert space(shallow=0.5).base_genome() is not None


@pytest.mark.parametrize(
    "lines, message",
    [
        ({"deep": (0.0, 20.0)}, r"gene 'lines.deep' bounds \[0.0, 20.0\] are outside \[-10.0, 10.0\]"),
        ({"deep": (1.0, 0.0)}, r"gene 'lines.deep' bounds \[1.0, 0.0\] must be finite, low <= high"),
        ({"shallow": -11.0}, r"lines modifier shallow=-11.0 is outside \[-10.0, 10.0\]"),
        ({"top": 1.0}, r"lines modifier has no scale 'top'; its scales: shallow, deep"),
    ],
)
def test_bad_search_space_modifiers_are_one_line(lines, message):
    with pytest.raises(ValueError, match=message):  # EvomergeError, inside pydantic's ValidationError
        SearchSpaceConfig(lines=lines)


# --- the store, resume and export ----------------------------------------------------------------


def test_store_round_trip_keeps_the_recipe_and_its_key(tmp_path):
    from evomerge.store import Candidate, Store

    s = space(shallow=[0.0, 1.0], deep=[0.5, 1.5])
    x = np.random.default_rng(1).random(s.n_var)
    recipe = s.decode(x)
    store = Store(tmp_path / "store.sqlite")
    cid = store.add(
        Candidate(
            recipe=recipe.to_dict(), recipe_key=recipe.key(), split="search", status="ok", genome=list(x)
        )
    )
    store.close()
    store = Store(tmp_path / "store.sqlite")
    got = store.get(cid)
    assert Recipe.from_dict(got.recipe) == recipe and Recipe.from_dict(got.recipe).key() == recipe.key()
    # a resumed run decodes the stored genome again and finds the candidate by its key
    assert store.find(s.decode(np.array(got.genome)).key(), "search").id == cid
    store.close()
    # a recipe without the modifier is written as before, so stored runs keep their keys
    plain = with_lines(recipe, None)
    assert all("lines" not in g for g in plain.to_dict()["groups"]) and plain.key() != recipe.key()


def test_mergekit_export_refuses_the_modifier_by_name():
    from evomerge.export import to_mergekit

    recipe = Recipe((GroupRecipe("other", "ties", {"weight": 0.5, "density": 0.5}, None, {"deep": 1.2}),))
    with pytest.raises(
        EvomergeError, match=r"the lines modifier \(group other\) is evomerge's own.*--format hf"
    ):
        to_mergekit(recipe, "B", {"a": "A", "b": "C"})
    assert to_mergekit(with_lines(recipe, None), "B", {"a": "A", "b": "C"})["merge_method"] == "ties"
