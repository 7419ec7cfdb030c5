"""The search space owns genome layout, bounds and decoding."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from evomerge.errors import EvomergeError
from evomerge.searchspace import SearchSpace, SearchSpaceConfig, load_space_config


def space(experts=("a", "b"), layers=4, **kw):
    return SearchSpace(load_space_config({"name": "per_layer", **kw}), list(experts), layers)


def test_catalogue_entry_loads_and_overrides():
    s = space(layer_groups=4)
    assert s.config.layer_groups == 4
    assert [g for g, _ in s.groups] == ["layers_0-0", "layers_1-1", "layers_2-2", "layers_3-3", "other"]
    assert s.n_var == 5 * 2  # one weight gene per expert per group


def test_decode_maps_genes_onto_bounds_per_group():
    s = space(genes={"weight": (0.2, 0.6)}, layer_groups=2)
    x = np.array([0.0, 1.0, 0.5, 0.25, 1.0, 0.0])
    r = s.decode(x)
    assert [g.name for g in r.groups] == ["layers_0-1", "layers_2-3", "other"]
    assert r.groups[0].parameters == {"weight": {"a": 0.2, "b": 0.6}}
    assert r.groups[1].parameters == {"weight": {"a": 0.4, "b": 0.3}}
    assert r.groups[0].layers == (0, 2)
    assert r.group_for("model.layers.3.mlp.up_proj.weight").name == "layers_2-3"
    assert r.group_for("lm_head.weight").name == "other"


def test_method_gene_and_unused_parameters():
    s = SearchSpace(load_space_config("per_layer_methods"), ["a", "b"], 4)
    assert s.describe()[:3] == ["layers_0-1/method", "layers_0-1/a/weight", "layers_0-1/a/density"]
    x = np.full(s.n_var, 0.5)
    x[0] = 0.0  # task_arithmetic: no density
    x[5] = 0.5  # ties
    r = s.decode(x)
    assert r.groups[0].method == "task_arithmetic" and "density" not in r.groups[0].parameters
    assert r.groups[1].method == "ties" and set(r.groups[1].parameters) == {"weight", "density"}


def test_encode_inverts_decode():
    s = SearchSpace(load_space_config("per_layer_methods"), ["a", "b", "c"], 4)
    x = np.random.default_rng(0).random(s.n_var)
    r = s.decode(x)
    assert s.decode(s.encode(r)).to_dict() == r.to_dict()


def test_identical_genomes_give_identical_keys():
    s = space()
    x = np.random.default_rng(1).random(s.n_var)
    assert s.decode(x).key() == s.decode(x.copy()).key()
    assert s.decode(x).key() != s.decode(1 - x).key()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"methods": ["ties"], "genes": {"density": (0.0, 1.5)}}, "bounds [0.0, 1.5] are outside [0, 1]"),
        ({"genes": {"weight": (0.8, 0.2)}}, "low exceeds high"),
        ({"genes": {"density": (0.1, 0.9)}}, "gene 'density' is not a parameter of ['task_arithmetic']"),
        ({"methods": ["slurp"]}, "unknown merge method 'slurp'"),
        ({"layer_group": 2}, "Extra inputs are not permitted"),
    ],
)
def test_bad_search_spaces(overrides, message):
    with pytest.raises((EvomergeError, ValueError)) as err:
        load_space_config({"name": "per_layer", **overrides})
    assert message in str(err.value)


def test_genomes_outside_unit_cube_are_refused():
    s = space()
    with pytest.raises(EvomergeError, match=r"\[0, 1\]"):
        s.decode(np.full(s.n_var, 1.5))


def test_unknown_catalogue_entry_lists_available():
    with pytest.raises(
        EvomergeError, match="available: data_flow, per_layer, per_layer_flow, per_layer_methods"
    ):
        load_space_config("per_layers")


def test_defaults_without_catalogue():
    assert SearchSpaceConfig().methods == ("task_arithmetic",)


def test_shared_parameters_get_one_gene_per_group():
    s = SearchSpace(SearchSpaceConfig(methods=("slerp",), genes={"t": (0.2, 0.8)}, layer_groups=2), ["a"], 4)
    assert s.describe() == ["layers_0-1/t", "layers_2-3/t", "other/t"]
    r = s.decode(np.array([0.0, 0.5, 1.0]))
    assert [g.parameters for g in r.groups] == [{"t": 0.2}, {"t": 0.5}, {"t": 0.8}]
    np.testing.assert_allclose(s.encode(r), [0.0, 0.5, 1.0])


def test_shared_and_per_model_genes_mix():
    cfg = SearchSpaceConfig(methods=("ties",), genes={"weight": (0, 1), "lambda": (0.5, 1.5)})
    s = SearchSpace(cfg, ["a", "b"], 4)
    assert s.describe() == ["layers_0-3/lambda", "layers_0-3/a/weight", "layers_0-3/b/weight"] + [
        "other/lambda",
        "other/a/weight",
        "other/b/weight",
    ]
    r = s.decode(np.array([0.5, 0.1, 0.2, 1.0, 0.3, 0.4]))
    assert r.groups[1].parameters == {"lambda": 1.5, "weight": {"a": 0.3, "b": 0.4}}


def test_methods_that_cannot_take_the_experts_are_refused():
    with pytest.raises(EvomergeError, match="'slerp' needs the base and exactly 1 other model"):
        SearchSpace(
            SearchSpaceConfig(methods=("ties", "slerp"), genes={"weight": (0, 1), "t": (0, 1)}), ["a", "b"], 4
        )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"methods": ("ties", "slerp"), "genes": {"weight": (0, 1)}},
            "search space method 'slerp' needs parameter 't': search it under `genes:` or set it under `fixed:`",
        ),
        (
            {"genes": {}},
            "search space has nothing to search: no `genes:` and one method (task_arithmetic); add genes "
            "from its numeric parameters (lambda, weight) or more methods",
        ),
        ({"genes": {"weight": (float("nan"), 1.0)}}, "bounds [nan, 1.0] must be finite numbers"),
        ({"fixed": {"weight": 0.5}}, "parameter 'weight' is both searched (genes) and fixed"),
        (
            {"fixed": {"lambda": "high"}},
            "fixed parameter 'lambda': merge method 'task_arithmetic' parameter 'lambda'='high' is outside",
        ),
        ({"fixed": {"normalize": 1}}, "parameter 'normalize' must be true or false"),
        (
            {"methods": ("ties",), "fixed": {"density": {"a": 0.5, "b": 2}}},
            "fixed parameter 'density': merge method 'ties' parameter 'density'=2 is outside [0.0, 1.0]",
        ),
    ],
)
def test_spaces_every_candidate_of_which_would_fail_are_refused(config, message):
    with pytest.raises(ValidationError) as err:
        SearchSpaceConfig(**config)
    assert message in str(err.value)
    fixed = {"density": [0.5, 1.0], "normalize": False, "lambda": 1.5}  # per expert, true/false, a number
    assert SearchSpaceConfig(methods=("ties",), fixed=fixed).fixed == fixed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fixed": {"lamda": 1.0}}, "fixed parameter 'lamda' is not a parameter of"),
        ({"genes": {"normalize": (0, 1)}}, "'normalize' is a true/false parameter; set it under `fixed:`"),
    ],
)
def test_bad_fixed_and_boolean_genes(overrides, message):
    with pytest.raises(ValueError) as err:  # EvomergeError, inside pydantic's ValidationError
        load_space_config({"methods": ["ties"], **overrides})
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["per_layer", "per_layer_methods"])
def test_expert_genomes_merge_into_exactly_that_expert(name):
    import torch

    from evomerge.merge import Merger

    s = SearchSpace(load_space_config(name), ["a", "b", "c"], 4)
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + ["lm_head.weight"]
    base = {n: torch.randn(8, 8, generator=g) for n in names}
    experts = {e: {n: t + torch.randn(8, 8, generator=g) for n, t in base.items()} for e in "abc"}
    merger = Merger(base, experts)
    for e in "abc":
        merged = merger.apply(s.decode(s.expert_genome(e)))
        for n in names:
            torch.testing.assert_close(merged[n], experts[e][n], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"methods": ["ties"], "genes": {"weight": (0.0, 1.0), "density": (0.0, 1.0)}},
            "search space cannot reproduce an expert: its methods ['ties'] include none of task_arithmetic, linear",
        ),
        ({"genes": {"weight": (0.0, 0.8)}}, "cannot reproduce expert 'a' in group 'layers_0-1'"),
        (
            {"genes": {"weight": (0.0, 1.0), "lambda": (0.5, 0.9)}},
            "it decodes to task_arithmetic {'weight': {'a': 1.0, 'b': 0.0}, 'lambda': 0.9}",
        ),
    ],
)
def test_spaces_that_cannot_express_an_expert_say_why(overrides, message):
    with pytest.raises(EvomergeError) as err:
        space(**overrides).expert_genome("a")
    assert message in str(err.value)


def test_groups_no_expert_changed_get_no_genes_and_stay_the_base():
    """LoRA experts leave the embeddings and norms as the base has them: the `other` group is inert,
    as is a layer group no expert touched; whatever the genome says, every merge keeps them the base."""
    import torch

    from evomerge.merge import Merger

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + ["lm_head.weight"]
    base = {n: torch.randn(8, 8, generator=g) for n in names}
    experts = {  # both experts change layers 2-3 only
        e: {
            n: t + (torch.randn(8, 8, generator=g) if ".2." in n or ".3." in n else 0)
            for n, t in base.items()
        }
        for e in "ab"
    }
    merger = Merger(base, experts)
    assert merger.changed_layers() == {2, 3}
    s = SearchSpace(load_space_config({"name": "per_layer_methods"}), ["a", "b"], 4, merger.changed_layers())
    assert s.inert == {"layers_0-1", "other"}
    assert s.describe() == [
        d
        for d in space(
            layer_groups=2, methods=["task_arithmetic", "ties"], genes={"weight": (0, 1), "density": (0, 1)}
        ).describe()
        if d.startswith("layers_2-3/")
    ]
    for x in np.random.default_rng(0).random((4, s.n_var)):
        recipe = s.decode(x)
        assert recipe.groups[0].method == recipe.groups[2].method == "task_arithmetic"
        assert recipe.groups[0].parameters == {"weight": {"a": 0.0, "b": 0.0}}
        merged = merger.apply(recipe)
        for n in (names[0], names[1], names[4]):
            torch.testing.assert_close(merged[n], base[n], rtol=0, atol=0)
    for e in "ab":  # the experts are still reachable, in fewer genes
        merged = merger.apply(s.decode(s.expert_genome(e)))
        for n in names:
            torch.testing.assert_close(merged[n], experts[e][n], rtol=0, atol=1e-6)
    y = s.encode(s.decode(np.full(s.n_var, 0.75)))  # encode reads the searched groups only
    assert y.shape == (s.n_var,) and s.decode(y) == s.decode(np.full(s.n_var, 0.75))
    with pytest.raises(
        EvomergeError, match="no expert differs from the base in any tensor: there is nothing to merge"
    ):
        SearchSpace(load_space_config({"name": "per_layer"}), ["a", "b"], 4, changed_layers=[])


def test_more_layer_groups_than_layers_is_an_error():
    """Not clamped to the model's depth: the config would claim groups the genome does not have."""
    with pytest.raises(EvomergeError) as err:
        space(layer_groups=50, layers=4)
    assert str(err.value) == (
        "search_space.layer_groups is 50 but the base model has 4 decoder layers; use at most 4 groups"
    )
    assert [g for g, _ in space(layer_groups=4, layers=4).groups][:-1] == [
        f"layers_{i}-{i}" for i in range(4)
    ]


def test_search_space_file_with_a_yaml_error_says_where(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("layer_groups: 2\nmethods: [ties\n")
    with pytest.raises(EvomergeError) as err:
        load_space_config(str(path))
    assert str(err.value) == (
        f"search space file {str(path)!r} is not valid YAML: line 3, column 1: expected ',' or ']', "
        "but got '<stream end>' (while parsing a flow sequence started at line 2, column 10)"
    )
    path.write_text("- layer_groups: 2\n")
    with pytest.raises(EvomergeError, match="must hold a mapping of keys"):
        load_space_config({"name": str(path)})
    with pytest.raises(
        EvomergeError, match="search_space.name must be a catalogue name or a YAML path, got 3"
    ):
        load_space_config({"name": 3})
