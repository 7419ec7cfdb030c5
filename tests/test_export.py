"""`evomerge export`: a recipe as a mergekit YAML that mergekit turns into the same weights."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import save_model_set

from evomerge.errors import EvomergeError
from evomerge.export import to_mergekit
from evomerge.merge import Merger
from evomerge.recipe import GroupRecipe, Recipe
from evomerge.store import Candidate, Store

EXPERTS = ["a", "b"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_model_set(tmp_path_factory.mktemp("models"), ["base", *EXPERTS])


def run_mergekit(config: dict, out, **options) -> dict[str, torch.Tensor]:
    pytest.importorskip("mergekit", reason="mergekit not installed (pip install -e '.[parity]')")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    # through YAML text, as mergekit-yaml reads it
    parsed = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config)))
    run_merge(parsed, str(out), options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, **options))
    sd = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def ours(folders, recipe: Recipe) -> dict[str, torch.Tensor]:
    sds = {n: load_file(folders[n] / "model.safetensors") for n in ["base", *EXPERTS]}
    return Merger(sds["base"], {e: sds[e] for e in EXPERTS}).apply(recipe)


RECIPES = {
    "ties-per-layer": Recipe(
        (
            GroupRecipe(
                "l0", "ties", {"weight": {"a": 0.7, "b": 0.2}, "density": {"a": 0.3, "b": 0.9}}, (0, 2)
            ),
            GroupRecipe(
                "l1", "ties", {"weight": {"a": 0.1, "b": 0.8}, "density": {"a": 0.6, "b": 0.4}}, (2, 4)
            ),
            GroupRecipe("other", "ties", {"weight": {"a": 0.5, "b": 0.5}, "density": {"a": 1.0, "b": 0.5}}),
        )
    ),
    "task_arithmetic-lambda-per-layer": Recipe(
        (
            GroupRecipe("l0", "task_arithmetic", {"weight": [0.3, 0.6], "lambda": 1.5}, (0, 3)),
            GroupRecipe("other", "task_arithmetic", {"weight": [0.9, 0.1]}),
        )
    ),
    "linear-with-base": Recipe(
        (
            GroupRecipe("l0", "linear", {"weight": [0.3, 0.6], "base_weight": 0.5}, (0, 2)),
            GroupRecipe("other", "linear", {"weight": [0.2, 0.2], "base_weight": 1.0}),
        )
    ),
    "breadcrumbs_ties": Recipe.uniform(
        "breadcrumbs_ties", {"weight": [0.6, 0.4], "density": 0.7, "gamma": 0.05}
    ),
    "model_stock": Recipe.uniform("model_stock", {}),
}


@pytest.mark.mergekit
@pytest.mark.parametrize("name", RECIPES)
def test_mergekit_reproduces_the_exported_recipe(folders, tmp_path, name):
    recipe = RECIPES[name]
    config = to_mergekit(recipe, str(folders["base"]), {e: str(folders[e]) for e in EXPERTS})
    theirs = run_mergekit(config, tmp_path / "out")
    mine = ours(folders, recipe)
    assert set(theirs) == set(mine)
    diff = max((mine[k] - t).abs().max().item() for k, t in theirs.items())
    assert diff <= 1e-6, diff


def test_per_layer_values_become_filters(folders):
    config = to_mergekit(RECIPES["ties-per-layer"], "B", {"a": "A", "b": "C"})
    assert config["merge_method"] == "ties" and config["base_model"] == "B"
    weight_a = config["models"][0]["parameters"]["weight"]
    assert weight_a == [
        {"filter": "layers.0.", "value": 0.7},
        {"filter": "layers.1.", "value": 0.7},
        {"filter": "layers.2.", "value": 0.1},
        {"filter": "layers.3.", "value": 0.1},
        {"value": 0.5},
    ]
    assert config["parameters"]["normalize"] is True  # uniform values stay scalars


def test_mixed_methods_are_refused():
    recipe = Recipe(
        (
            GroupRecipe("l0", "ties", {"weight": [0.5, 0.5], "density": 0.5}, (0, 2)),
            GroupRecipe("other", "task_arithmetic", {"weight": [0.5, 0.5]}),
        )
    )
    with pytest.raises(EvomergeError, match="several merge methods .*l0: ties, other: task_arithmetic"):
        to_mergekit(recipe, "B", {"a": "A", "b": "C"})


def test_cli_export_writes_yaml_and_refuses_bad_ids(folders, tmp_path):
    from click.testing import CliRunner

    from evomerge.cli import app

    run = tmp_path / "run"
    store = Store(run / "store.sqlite")
    store.set_meta(
        "models", {"base": "B", "experts": {"a": "A", "b": "C"}, "tokenizer": None, "dtype": "float32"}
    )
    recipe = RECIPES["ties-per-layer"]
    cid = store.add(Candidate(recipe=recipe.to_dict(), recipe_key=recipe.key(), split="search", status="ok"))
    store.close()
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run), "--candidate", str(cid), "--format", "mergekit"])
    assert result.exit_code == 0, result.output
    written = run / "exports" / f"candidate-{cid}.mergekit.yaml"
    assert yaml.safe_load(written.read_text()) == to_mergekit(recipe, "B", {"a": "A", "b": "C"})
    before = written.read_text()
    again = runner.invoke(app, ["export", str(run), "--candidate", str(cid)])
    assert again.exit_code == 2 and "already exists" in again.stderr and written.read_text() == before
    missing = runner.invoke(app, ["export", str(run), "--candidate", "99"])
    assert missing.exit_code == 2 and "has no candidate 99" in missing.stderr
    not_a_run = runner.invoke(app, ["export", str(tmp_path), "--candidate", "1"])
    assert not_a_run.exit_code == 2 and "not a run folder" in not_a_run.stderr
