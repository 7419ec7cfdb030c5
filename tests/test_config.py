"""Reading a config: YAML errors with their line and column, and one line per validation problem that
names where it is, what is allowed and what was given."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.config import load_config, parse_config
from evomerge.errors import EvomergeError

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "experiments" / "demo.yaml").read_text())


def error_of(path: Path) -> str:
    with pytest.raises(EvomergeError) as err:
        load_config(path)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    return message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "models:\n  base: zoo:base\n  experts: x: y\n",
            "line 3, column 13: mapping values are not allowed here",
        ),
        (
            "models: {base: zoo:base}\nfitness:\n  tasks: [a, b\n",
            "line 4, column 1: expected ',' or ']', but got '<stream end>' "
            "(while parsing a flow sequence started at line 3, column 10)",
        ),
        ("seed: 1\nseed: *nope\n", "line 2, column 7: found undefined alias 'nope'"),
        ("seed: 1\n\tworkers: 2\n", "line 2, column 1: found character '\\t' that cannot start any token"),
        ('seed: 1\nout: "a\x00"\n', "line 2, column 8: unacceptable character #x0000"),
    ],
)
def test_yaml_syntax_errors_keep_line_and_column(tmp_path, text, where):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    assert error_of(path).startswith(f"config file {str(path)!r} is not valid YAML: {where}")


def test_unreadable_config_files(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("models: !!python/object:os.system x\n")
    assert error_of(path) == (
        f"config file {str(path)!r} holds YAML that evomerge cannot read: line 1, column 9: could not "
        "determine a constructor for the tag 'tag:yaml.org,2002:python/object:os.system'"
    )
    path.write_bytes(b"seed: \xff\xfe\n")
    assert error_of(path) == f"config file {str(path)!r} is not UTF-8 text (byte 6)"
    path.write_text("")  # empty: the required keys are named
    assert error_of(path) == "config: missing required key 'models'"
    path.write_text("- models\n")
    assert error_of(path) == f"config file {str(path)!r} must hold a mapping of keys"


def test_overrides_into_a_section_that_is_no_mapping(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({**DEMO, "ray": 5}))
    with pytest.raises(EvomergeError, match=r"^config: ray: Input should be a mapping of keys \(got 5\)$"):
        load_config(path, **{"ray.address": "auto"})


def parse_error(changes=None, **named) -> str:
    with pytest.raises(EvomergeError) as err:
        parse_config({**DEMO, **(changes or {}), **named})
    message = str(err.value)
    assert len(message.splitlines()) == 1
    return message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (  # inside a search space: its own keys, not the run config's
            {"search_space": {"name": "per_layer", "colour": 1}},
            "config: unknown key 'search_space.colour'; allowed: name, layer_groups, methods, genes, fixed",
        ),
        (
            {"search_space": {"layer_groups": "two"}},
            "config: search_space.layer_groups: Input should be a valid integer, unable to parse string as "
            "an integer (got 'two')",
        ),
        (  # inside an objective
            {"objectives": [{"name": "x", "colour": 1}]},
            "config: unknown key 'objectives.0.colour'; allowed: name, of, metric, filter, direction, "
            "estimator, items, selection",
        ),
        ({"search_space": [1]}, "search_space must be a catalogue name, a YAML path or a mapping of keys"),
        ({"search_space": {"name": 3}}, "search_space.name must be a catalogue name or a YAML path, got 3"),
        ({"models": [1, 2]}, "config: models: Input should be a mapping of keys (got [1, 2])"),
        ({"seed": -1}, "config: seed: Input should be greater than or equal to 0 (got -1)"),
        ({"seed": 2**32}, "config: seed: Input should be less than 4294967296 (got 4294967296)"),
        ({7: "x"}, "config: 7: Keys should be strings (got 7)"),
        (
            {"search_space": {"methods": ["zoo:base"]}},
            "merge method 'zoo:base' does not import: ModuleNotFoundError: No module named 'zoo'",
        ),
        ({"search_space": {"methods": ["os:path"]}}, "merge method 'os:path' is a module, not a Declaration"),
        (
            {"algorithm": {"name": ".relative:Class"}},
            "algorithm '.relative:Class' does not import: TypeError: the 'package' argument is required",
        ),
    ],
)
def test_validation_errors_name_the_place_and_the_value(changes, message):
    assert message in parse_error(changes)


def test_a_value_no_alternative_takes_lists_them_all():
    """fitness.timeout is a number, auto or none: the error names all three, not the first one tried."""

    message = parse_error(fitness={**DEMO["fitness"], "timeout": "soon"})
    assert (
        message == "config: fitness.timeout: Input should be a valid number or 'auto' or 'none' (got 'soon')"
    )


def test_fitness_module_that_fails_on_import(tmp_path, monkeypatch):
    (tmp_path / "broken_fitness.py").write_text("def f(model, tokenizer:\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fitness = {"function": "broken_fitness:f"}
    message = parse_error(fitness=fitness, objectives=[{"name": "m", "of": "m"}])
    assert message.startswith("config: fitness function 'broken_fitness:f' does not import: SyntaxError: ")
    fitness = {"function": ".relative:f"}
    assert "fitness function '.relative:f' does not import: TypeError" in parse_error(fitness=fitness)


def test_include_folder_with_a_task_yaml_evomerge_cannot_read(tmp_path):
    """lm-eval task YAMLs may use !function tags, which plain YAML cannot read: one line, not a traceback."""
    from evomerge.fitness import check_tasks

    (tmp_path / "task.yaml").write_text("task: mine\nprocess_docs: !function utils.process\n")
    with pytest.raises(EvomergeError) as err:
        check_tasks(["mine"], [str(tmp_path)])
    assert str(err.value) == (
        f"fitness task file {str(tmp_path / 'task.yaml')!r} holds YAML that evomerge cannot read: "
        "line 2, column 15: could not determine a constructor for the tag '!function'"
    )
