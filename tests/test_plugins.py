"""Plugins: a package outside evomerge (tests/plugin_pkg) adds a merge method, an estimator, a fitness
backend with its own options and a search algorithm through evomerge's entry-point groups, without
editing evomerge, and run configs use them.

The plugin is installed for a subprocess only, as pip would install it (its package and a dist-info with
the entry points of its pyproject.toml on the path): installed into the test environment, it would add
its names to every other test's registries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PLUGIN = Path(__file__).parent / "plugin_pkg"

SCRIPT = """
import json, sys

import torch
from click.testing import CliRunner

from evomerge import irt
from evomerge.algorithms import ALGORITHMS
from evomerge.cli import app
from evomerge.fitness import BACKENDS, make_fitness
from evomerge.merge import METHODS, get_method, merge_state_dicts

out = {
    "registered": [
        "plugin_average" in METHODS,
        "plugin_mean" in irt.ESTIMATORS,
        "plugin_random" in ALGORITHMS,
        "plugin_constant" in BACKENDS,
    ]
}
out["sketches"] = get_method("plugin_average").sketches
config, scored, bad, run = sys.argv[1:]
checks = [CliRunner().invoke(app, ["check", c, "--out", run]) for c in (config, scored, bad)]
out["check"] = [[r.exit_code, r.output] for r in checks]
out["score"] = make_fitness(plugin_constant=0.25, plugin_scale=2.0).evaluate(None, None, "search").values
models = {"base": {"w": torch.zeros(3)}, "a": {"w": torch.ones(3)}, "b": {"w": torch.full((3,), 3.0)}}
merged = merge_state_dicts(models, "plugin_average", base="base", parameters={"weight": {"a": 1.0, "b": 0.5}})
out["merged"] = merged["w"].tolist()
print(json.dumps(out))
"""


def _entry_points() -> str:
    """The plugin's entry points as pip writes them into its dist-info (entry_points.txt)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
        import tomli as tomllib
    groups = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]["entry-points"]
    return "".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items()) + "\n"
        for group, eps in groups.items()
    )


def _installed(tmp_path: Path) -> dict[str, str]:
    """The environment of a process in which the plugin is installed."""
    site = tmp_path / "site"
    info = site / "evomerge_demo_plugin-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evomerge-demo-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(_entry_points())
    path = [str(PLUGIN), str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def test_the_test_environment_does_not_have_the_plugin():
    from evomerge import irt
    from evomerge.algorithms import ALGORITHMS
    from evomerge.config import fitness_model
    from evomerge.fitness import BACKENDS
    from evomerge.merge import METHODS

    assert "plugin_average" not in METHODS and "plugin_mean" not in irt.ESTIMATORS
    assert "plugin_random" not in ALGORITHMS and "plugin_constant" not in BACKENDS
    assert "plugin_scale" not in fitness_model().model_fields


def test_a_plugin_package_adds_a_method_an_estimator_a_fitness_backend_and_an_algorithm(zoo_dir, tmp_path):
    models = {"base": "zoo:base", "experts": {"addition": "zoo:addition", "script": "zoo:script"}}
    configs = {
        "plugin": {
            "models": models,
            "search_space": {"name": "per_layer", "methods": ["plugin_average"]},
            "fitness": {"tasks": ["zoo_addition", "zoo_script"]},
            "objectives": [{"name": "acc", "of": "mean", "estimator": "plugin_mean", "items": 10}],
            "algorithm": {"name": "plugin_random", "pop_size": 4, "generations": 2},
        },
        # the plugin's backend, selected and configured by the options its own model declares
        "scored": {
            "models": models,
            "fitness": {"plugin_constant": 0.25, "plugin_scale": 2.0},
            "objectives": [{"name": "score", "of": "score"}],
            "algorithm": {"name": "plugin_random", "pop_size": 4, "generations": 2},
        },
        "bad": {"models": models, "fitness": {"plugin_constant": 0.25, "plugin_scale": -1}},
    }
    for name, data in configs.items():
        data |= {"zoo": {"cache_dir": str(zoo_dir.parent)}, "workers": 1}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            *(str(tmp_path / f"{n}.yaml") for n in configs),
            str(tmp_path / "run"),
        ],
        env=_installed(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["registered"] == [True, True, True, True]
    assert out["sketches"] is False  # nothing declared: the plan counts no sketches for it
    (code, output), (scored_code, scored_output), (bad_code, bad_output) = out["check"]
    assert code == 0, output
    assert scored_code == 0, scored_output
    assert bad_code == 2
    assert (
        bad_output.strip() == "error: config: fitness.plugin_scale: Input should be greater than 0 (got -1)"
    )
    assert out["score"] == {"score": 0.5}
    assert out["merged"] == pytest.approx([(1.0 * 1 + 0.5 * 3) / 1.5] * 3)


def test_an_entry_point_that_does_not_import_is_named(tmp_path, monkeypatch):
    """A broken plugin is an error naming the plugin and its group, not a traceback from importlib."""
    from evomerge.errors import EvomergeError
    from evomerge.registry import Registry

    site = tmp_path / "site"
    info = site / "broken_plugin-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[evomerge.test_broken]\nbroken = no_such_module_here\n")
    monkeypatch.syspath_prepend(str(site))
    registry: Registry[object] = Registry("thing", group="evomerge.test_broken")
    with pytest.raises(
        EvomergeError,
        match=r"thing plugin 'broken' \(evomerge.test_broken: no_such_module_here\) does not import",
    ):
        registry.names()


def test_methods_declare_the_sketches_they_build():
    """preflight reads the declaration; it is the set the prepare functions build sketches for."""
    from evomerge.merge import METHODS, get_method, sce
    from evomerge.merge.sparsify import prepare_magnitude

    declared = {m for m in METHODS if get_method(m).sketches}
    assert declared == {m for m in METHODS if get_method(m).prepare in (prepare_magnitude, sce.prepare)}
    assert declared == {"ties", "breadcrumbs", "breadcrumbs_ties", "sce"}


def test_the_demo_zoos_register_through_entry_points():
    """The core names no zoo: evomerge's own metadata declares the zoo prefixes."""
    from importlib.metadata import entry_points

    from evomerge.models import REFERENCES

    declared = {ep.name: ep.value for ep in entry_points(group="evomerge.model_references")}
    assert declared["zoo"] == "evomerge.zoos.tiny:REFERENCE"
    assert {"zoo", "realzoo"} <= set(REFERENCES)
