"""Fuzzing the config: random edits of valid configs, checked with `evomerge check`.

Whatever a config says, `evomerge check` either accepts it (exit code 0) or refuses it with one line on
stderr that starts with ``error: `` (exit code 2): never a traceback, never another exit code. The edits
are drawn from the config's pydantic schema (evomerge.config.RunConfig): wrong types, numbers out of
bounds, huge and negative numbers, None, strings where lists are expected, nested garbage, unknown keys
at any level and deleted keys and sections. `check` builds nothing (zoo references are only named).
"""

from __future__ import annotations

import copy
import math
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from tiny import save_model_set

from evomerge.cli import app
from evomerge.config import FitnessConfig, RunConfig, fitness_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "experiments" / "demo.yaml").read_text())


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The valid configs the edits start from: the demo (zoo models, lm-eval tasks) and a Python
    fitness over local model folders with two objectives."""
    folders = save_model_set(tmp_path_factory.mktemp("models"), ["base", "a", "b"])
    python = {
        "models": {"base": str(folders["base"]), "experts": {"a": str(folders["a"]), "b": str(folders["b"])}},
        "search_space": {"name": "per_layer_methods", "layer_groups": 2},
        "fitness": {"function": "fitness_fns:closeness"},
        "objectives": [
            {"name": "first", "of": "first"},
            {"name": "second", "of": "second", "direction": "min"},
        ],
        "algorithm": {"name": "nsga2", "pop_size": 4, "generations": 2},
        "workers": 1,
    }
    for config in (DEMO, python):
        code, err = check(config)
        assert code == 0, err
    # lm-eval indexes its own tasks (seconds) the first time a task name is not in the catalogue
    code, err = check({**DEMO, "fitness": {"tasks": ["no_such_task"]}})
    assert code == 2 and "unknown fitness task 'no_such_task'" in err, err
    return {"demo": DEMO, "python": python}


def check(config: Any) -> tuple[int, str]:
    """`evomerge check` on ``config`` written as YAML, in process, in an empty working folder: a
    relative path in the config (say, an include folder ".") reaches nothing of the checkout's."""
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp) / "a" / "cwd"  # "..", the only parent a name without "/" reaches, holds only cwd
        cwd.mkdir(parents=True)
        path = cwd / "config.yaml"
        path.write_text(yaml.safe_dump(config, allow_unicode=True))
        with runner.isolated_filesystem(temp_dir=cwd):
            result = runner.invoke(app, ["check", str(path), "--out", str(Path(tmp) / "run")])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        trace = "".join(traceback.format_exception(*result.exc_info))
        pytest.fail(f"`evomerge check` raised on\n{yaml.safe_dump(config)}\n{trace}")
    return result.exit_code, result.stderr


# --- the schema: every path a config may have, with what the field allows -----------------------------


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The config sections an annotation holds (through Optional, unions and tuple[Section, ...]); the
    fitness section as it is validated, with every backend's options."""
    if annotation is FitnessConfig:
        return [fitness_model()]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def schema_paths(model: type[BaseModel] = RunConfig, prefix: tuple[Any, ...] = ()) -> list[tuple]:
    """(path, annotation, field) for every field of the config, nested sections included; a tuple of
    sections is entered at index 0, a mapping at a key the edit names."""
    out = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        out.append((path, field.annotation, field))
        for sub in _models(field.annotation):
            origin = typing.get_origin(field.annotation)
            out += schema_paths(sub, (*path, 0) if origin is tuple else path)
    return out


SCHEMA = schema_paths()
assert len(SCHEMA) > 40, "the schema walk lost the nested sections"


def _bounds(field: Any) -> list[float]:
    """The numbers just outside, on and far from a field's declared bounds."""
    values: list[float] = []
    for m in field.metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            bound = getattr(m, attr, None)
            if isinstance(bound, int | float):
                values += [bound - 1, bound, bound + 1]
    return values


def _kinds(annotation: Any) -> set[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return {k for arg in typing.get_args(annotation) for k in _kinds(arg)}
    return {origin or annotation}


# Names the config's validators know, so that edits reach the checks behind the type checks.
NAMES = [
    "zoo:base",
    "zoo:addition",
    "zoo:nothing",
    "realzoo:base",
    "realzoo:nothing",
    "fitness_fns:closeness",
    "fitness_fns:nan",
    "fitness_fns:TARGET",
    "fitness_fns",
    "no_such_module:f",
    ".relative:f",
    "os:path",
    "ties",
    "slerp",
    "task_arithmetic",
    "dare_ties",
    "per_layer",
    "per_layer_methods",
    "per_layer_sparse",
    "nope.yaml",
    "ga",
    "nsga2",
    "nsga3",
    "random",
    "cmaes",
    "pymoo.algorithms.moo.spea2:SPEA2",
    "pymoo.algorithms.moo.spea2:Nothing",
    "mean",
    "first",
    "second",
    "zoo_addition",
    "zoo_script",
    "irt",
    "sgpirt",
    "gmpirt",
    "information",
    "experts",
    "min",
    "max",
    "2pl",
    "multidim_2pl",
    "bfloat16",
    "weight",
    "density",
    "lambda",
    "t",
    "normalize",
    "search",
    "test",
    "train",
    "",
    ".",
    "..",
    "~",
]
HUGE = [10**400, -(10**400), 2**63, 2**64, -(2**63) - 1, 1e308, -1e308, math.inf, -math.inf, math.nan]
# Text without "/" (a path to anywhere: an include folder "/" would index the whole disk) or "~".
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/~"), max_size=12)
KEYS = st.one_of(TEXT, st.sampled_from(["name", "weight", "tasks", "0", "items"]), st.integers(-3, 3))
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(HUGE),
    st.integers(-3, 3),
    TEXT,
    st.sampled_from(NAMES),
)
GARBAGE = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(KEYS, inner, max_size=4),
    ),
    max_leaves=12,
)


@st.composite
def value_for(draw: st.DrawFn, field: Any) -> Any:
    """A value for one field: often of the field's own type near or past its bounds, so that edits get
    past the type checks to the checks behind them; otherwise a known name or garbage."""
    kinds = _kinds(field.annotation)
    typed = []
    bounds = _bounds(field)
    if bounds:
        typed.append(st.sampled_from(bounds))
    if kinds & {int, float}:
        typed += [st.sampled_from([*HUGE, -1, 0, 1, 2, 0.5, -0.5]), st.integers(-5, 50)]
    if kinds & {float}:
        typed.append(st.floats(-2, 2))
    if kinds & {str}:
        typed.append(st.sampled_from(NAMES))
    if kinds & {tuple, list}:  # a string where a list is expected; short lists of names and numbers
        typed += [TEXT, st.lists(st.one_of(st.sampled_from(NAMES), st.floats(-2, 2), LEAVES), max_size=3)]
    if kinds & {dict}:
        typed.append(st.dictionaries(st.sampled_from(NAMES), st.one_of(LEAVES, st.floats(-2, 2)), max_size=3))
    literal = [a for k in kinds if typing.get_origin(k) is typing.Literal for a in typing.get_args(k)]
    literal += [a for a in typing.get_args(field.annotation) if isinstance(a, str)]
    if literal:
        typed.append(st.sampled_from([*literal, *(s.upper() for s in literal), "nope"]))
    if not typed or draw(st.integers(0, 3)) == 0:
        return draw(st.one_of(GARBAGE, LEAVES, st.sampled_from(NAMES)))
    return draw(st.one_of(typed))


# --- edits -----------------------------------------------------------------------------------------------


def existing_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key and index path present in a config."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out += existing_paths(child, (*prefix, key))
    return out


def _parent(config: dict[str, Any], path: tuple[Any, ...], create: bool) -> Any:
    """The container that holds ``path``'s last key (made on the way when ``create``), else None."""
    node: Any = config
    for key, following in zip(path[:-1], path[1:], strict=True):
        if isinstance(node, dict):
            if key not in node:
                if not create:
                    return None
                node[key] = [] if isinstance(following, int) else {}
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int):
            if key >= len(node):
                if not create:
                    return None
                node.append([] if isinstance(following, int) else {})
                key = len(node) - 1
            node = node[key]
        else:
            return None
    return node


def apply(config: dict[str, Any], edit: tuple) -> None:
    """Set or delete one key or list item; a path through something that is no section is left alone."""
    kind, path, value = edit
    parent = _parent(config, path, create=kind != "delete")
    key = path[-1]
    if isinstance(parent, list) and isinstance(key, int):
        if kind == "delete":
            if key < len(parent):
                del parent[key]
        elif key < len(parent):
            parent[key] = value
        else:
            parent.append(value)
    elif isinstance(parent, dict):
        if kind == "delete":
            parent.pop(key, None)
        else:
            parent[key] = value


@st.composite
def edits(draw: st.DrawFn, config: dict[str, Any]) -> tuple:
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "unknown", "set-existing"]))
    if kind == "delete":
        return ("delete", draw(st.sampled_from(existing_paths(config))), None)
    if kind == "set-existing":  # values in mappings and lists the schema does not name (experts, genes)
        return ("set", draw(st.sampled_from(existing_paths(config))), draw(GARBAGE))
    if kind == "unknown":
        sections = [()] + [p for p in existing_paths(config) if isinstance(_get(config, p), dict)]
        where = draw(st.sampled_from(sections))
        return (
            "set",
            (*where, draw(st.one_of(TEXT, st.sampled_from(["colour", "Name", "pop-size"])))),
            draw(GARBAGE),
        )
    path, _, field = draw(st.sampled_from(SCHEMA))
    if typing.get_origin(field.annotation) is dict and draw(st.booleans()):
        path = (*path, draw(st.one_of(st.sampled_from(["a", "b", "weight", "density", "t", "x"]), TEXT)))
        return ("set", path, draw(GARBAGE))
    return ("set", path, draw(value_for(field)))


def _get(config: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        config = config[key]
    return config


@st.composite
def edited_configs(draw: st.DrawFn) -> tuple[str, list[tuple]]:
    name = draw(st.sampled_from(["demo", "python"]))
    start = copy.deepcopy(DEMO if name == "demo" else PYTHON_SHAPE)
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        step = draw(edits(start))
        apply(start, step)
        steps.append(step)
    return name, steps


# The python config's shape (its model folders are filled in by the fixture) for drawing edit paths.
PYTHON_SHAPE = {
    "models": {"base": "", "experts": {"a": "", "b": ""}},
    "search_space": {"name": "per_layer_methods", "layer_groups": 2},
    "fitness": {"function": "fitness_fns:closeness"},
    "objectives": [{"name": "first", "of": "first"}, {"name": "second", "of": "second", "direction": "min"}],
    "algorithm": {"name": "nsga2", "pop_size": 4, "generations": 2},
    "workers": 1,
}


def assert_one_line_or_ok(config: Any) -> None:
    code, err = check(config)
    assert code in (0, 2), f"exit code {code}: {err}"
    if code == 2:
        lines = err.strip("\n").splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{err}"


@settings(
    max_examples=60,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(edited_configs())
@example(("demo", [("set", ("search_space",), [1])]))
@example(("demo", [("set", ("search_space", "colour"), 1)]))
@example(("demo", [("set", ("objectives", 0, "colour"), 1)]))
@example(("demo", [("set", ("search_space", "name"), 3)]))
@example(("demo", [("set", (7,), "x")]))
@example(("python", [("set", ("algorithm", "name"), ".relative:Class")]))
@example(("python", [("set", ("fitness", "function"), ".relative:f")]))
@example(("demo", [("set", ("algorithm", "pop_size"), 1e308), ("set", ("algorithm", "generations"), 1e308)]))
@example(("demo", [("set", ("seed",), -1)]))
@example(("demo", [("set", ("search_space", "methods"), ["zoo:base"])]))
@example(("demo", [("set", ("search_space", "methods"), ["os:path"])]))
@example(("demo", [("set", ("search_space", "genes", "weight"), [math.nan, math.nan])]))
@example(("python", [("set", ("search_space", "fixed"), {"lambda": "high"})]))
def test_check_answers_every_config_in_one_line(bases, drawn):
    name, steps = drawn
    config = copy.deepcopy(bases[name])
    for step in steps:
        apply(config, step)
    assert_one_line_or_ok(config)


@pytest.mark.parametrize(
    "text",
    [
        "models: [1, 2",  # YAML syntax
        "models:\n  base: x\n   experts: y\n",
        "- 1\n- 2\n",  # not a mapping
        "",  # empty: the missing keys are named
        "? [1, 2]\n: x\n",  # a key that is a list
        "1: 2\n",  # a key that is a number
        "models: !!python/object:os.system x\n",  # a tag safe YAML has no value for
        "models: *anchor\n",
        "x: \x00\n",
    ],
)
def test_unparseable_configs_answer_in_one_line(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["check", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


@pytest.mark.parametrize("key", ["pop_size", "generations"])
def test_a_huge_population_answers_in_one_line(key):
    config = copy.deepcopy(DEMO)
    config["algorithm"][key] = 10**400
    assert_one_line_or_ok(config)


# --- check refuses what run refuses ----------------------------------------------------------------------


class Started(Exception):
    """Raised where a run would start its workers: every check before the first evaluation has passed."""


def run_until_workers(config: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[int | None, str]:
    """`evomerge run` on ``config`` as `check` gets it (same folders, same --out), stopped where it would
    start its workers: (None, "") when it gets there, else its exit code and stderr."""

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr("evomerge.search.WorkerPool", started)
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp) / "a" / "cwd"
        cwd.mkdir(parents=True)
        path = cwd / "config.yaml"
        path.write_text(yaml.safe_dump(config, allow_unicode=True))
        with runner.isolated_filesystem(temp_dir=cwd):
            result = runner.invoke(app, ["run", str(path), "--out", str(Path(tmp) / "run")])
        assert not (Path(tmp) / "run" / "store.sqlite").exists()
    if isinstance(result.exception, Started):
        return None, ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        pytest.fail(
            f"`evomerge run` raised on\n{yaml.safe_dump(config)}\n"
            + "".join(traceback.format_exception(*result.exc_info))
        )
    return result.exit_code, result.stderr


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(edited_configs())
@example(("python", []))
@example(("demo", []))
@example(("python", [("set", ("search_space", "layer_groups"), 4), ("set", ("seed",), 5)]))
@example(("demo", [("set", ("fitness", "tasks"), ["zoo_addition_gen"])]))
@example(("python", [("set", ("search_space", "layer_groups"), 9)]))
@example(("python", [("set", ("search_space", "name"), "dataflow")]))
def test_check_refuses_what_run_refuses_before_its_first_evaluation(bases, zoo_dir, monkeypatch, drawn):
    """Whatever a fuzzed config is, `evomerge run` either gets as far as starting its workers (and then
    `check` accepted it) or refuses it with the very line `check` gives, exit code 2 for both."""
    name, steps = drawn
    config = copy.deepcopy(bases[name])
    for step in steps:
        apply(config, step)
    if name == "demo" and config.get("zoo") != DEMO.get("zoo"):
        return  # a zoo elsewhere: run would build one (minutes); check never builds
    code, err = check(config)
    ran, ran_err = run_until_workers(config, monkeypatch)
    if ran is None:
        assert code == 0, f"run started on a config check refused ({err.strip()}):\n{yaml.safe_dump(config)}"
    else:
        assert (ran, ran_err.strip()) == (code, err.strip()), yaml.safe_dump(config)
