"""Bad input gets one line naming the problem and exit code 2; nothing stored is touched."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner
from tiny import save_model_set

from evomerge.cli import app


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    folders = save_model_set(root, ["base", "a", "b"])
    folders["wide"] = save_model_set(root, ["wide"], hidden=64)["wide"]
    return folders


def write_config(tmp_path, models, **changes):
    cfg = {
        "models": {"base": str(models["base"]), "experts": {"a": str(models["a"]), "b": str(models["b"])}},
        "fitness": {"tasks": ["zoo_addition", "zoo_script"], "items": 5},
        "algorithm": {"name": "ga", "pop_size": 2, "generations": 1},
        "out": str(tmp_path / "run"),
    }
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"algorithm__popsize": 4},
            "config: unknown key 'algorithm.popsize'; allowed: name, pop_size, generations, options, initial",
        ),
        ({"colour": "red"}, "config: unknown key 'colour'; allowed: models, search_space, fitness"),
        ({"models__base": "./no/such/model"}, "model folder './no/such/model' does not exist"),
        ({"search_space": {"methods": ["tie"]}}, "unknown merge method 'tie' (did you mean 'ties'?)"),
        (
            {"search_space": {"methods": ["ties"], "genes": {"weight": [0, 1], "density": [0.2, 1.5]}}},
            "search space gene 'density' bounds [0.2, 1.5] are outside [0, 1]",
        ),
        (
            {"fitness__tasks": ["zoo_addition", "zoo_adition"]},
            "unknown fitness task 'zoo_adition' (did you mean 'zoo_addition'?)",
        ),
        (
            {"objectives": [{"name": "x", "of": "zoo_reversal"}]},
            "objective 'x' is of 'zoo_reversal', which is not a fitness task",
        ),
        (
            {"algorithm__name": "smsemo"},
            "unknown algorithm 'smsemo' (did you mean 'smsemoa'?); available: bo, cmaes, de,",
        ),
        ({"algorithm__name": "nsga2"}, "algorithm 'nsga2' needs two or more objectives, the config has 1"),
        (
            {"algorithm__options": {"mutation_rate": 0.1}},
            "algorithm 'ga' has no option 'mutation_rate'; its options:",
        ),
        (
            {"algorithm__initial": "expert"},
            "config: algorithm.initial: Input should be 'random' or 'experts'",
        ),
        (
            {"algorithm__initial": "experts", "algorithm__name": "random"},
            "algorithm.initial: experts needs an algorithm that starts from a given population; 'random' "
            "does not (allowed: ga, de, cmaes,",
        ),
        (
            {
                "algorithm__initial": "experts",
                "algorithm__pop_size": 3,
                "models__experts": {"a": "x", "b": "y", "c": "z", "d": "w"},
            },
            "algorithm.initial: experts puts 4 experts in the first population; pop_size is 3",
        ),
        (
            {"algorithm__initial": "experts", "algorithm__options": {"sampling": [[0.5]]}},
            "algorithm.initial: experts sets the first population; remove algorithm.options.sampling",
        ),
        (
            {"algorithm__initial": "experts", "search_space": {"genes": {"weight": [0.2, 1.0]}}},
            "search space cannot reproduce expert 'a' in group 'layers_0-3': it decodes to task_arithmetic",
        ),
        (
            {"fitness__tasks": [], "fitness__function": "no_such_mod:f"},
            "fitness function 'no_such_mod:f' does not import",
        ),
        (
            {"fitness__function": "os:getcwd"},
            "fitness: give either `tasks` (lm-eval task names) or `function`",
        ),
    ],
)
def test_bad_config_one_line_exit_2(tmp_path, models, changes, message):
    code, err = run_cli("run", write_config(tmp_path, models, **changes))
    assert code == 2, err
    assert message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_experts_with_other_shapes(tmp_path, models):
    path = write_config(
        tmp_path, models, models__experts={"a": str(models["a"]), "wide": str(models["wide"])}
    )
    code, err = run_cli("run", path)
    assert code == 2
    assert err == "error: expert 'wide' has tensor shapes that differ from the base: hidden_size 64 vs 32"


def test_missing_config_file(tmp_path):
    code, err = run_cli("run", tmp_path / "nope.yaml")
    assert (code, err) == (2, f"error: config file {str(tmp_path / 'nope.yaml')!r} does not exist")


def test_existing_run_folder_is_not_overwritten(tmp_path, models):
    run = tmp_path / "run"
    run.mkdir()
    (run / "store.sqlite").write_bytes(b"precious")
    code, err = run_cli("run", write_config(tmp_path, models))
    assert code == 2 and "already holds a run" in err
    assert (run / "store.sqlite").read_bytes() == b"precious"


def test_front_of_a_folder_that_is_no_run(tmp_path):
    code, err = run_cli("front", tmp_path)
    assert code == 2 and "has no front.csv" in err


def test_console_script_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [1, 2]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "run", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: config: models")
    assert "Traceback" not in proc.stderr


def test_output_to_a_file_has_no_colour_codes_and_keeps_lines_whole():
    import io

    from evomerge.cli import make_console
    from evomerge.report import print_frame

    console = make_console(terminal=False)
    out = io.StringIO()
    console.file = out
    long = "best model picked on search values: " + "the front member with the best mean, " * 10 + "the end"
    console.print(long)
    console.print("[bold red]error[/] 2")
    print_frame(console, __import__("pandas").DataFrame({"a": [1.5]}), "a table")
    text = out.getvalue()
    assert long + "\n" in text and "error 2\n" in text
    assert "\x1b[" not in text


def _edited_copy(src, dst, **changes):
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


@pytest.mark.parametrize(
    ("edit", "changes", "message"),
    [
        (
            "a",
            {"intermediate_size": 80},
            "expert 'a' has tensor shapes that differ from the base: intermediate_size 80 vs 64",
        ),
        ("a", {"model_type": "mistral"}, "expert 'a' is a 'mistral' model, the base is 'llama'"),
        (
            "all",
            {"model_type": "gemma3_text"},
            "data-flow scales need a pre-norm decoder whose residual-output projections evomerge knows; "
            "model_type 'gemma3_text' is not one",
        ),
    ],
)
def test_check_refuses_what_run_refuses_before_it_starts(tmp_path, models, edit, changes, message):
    """What `evomerge run` would refuse once it read the models' configs, `evomerge check` refuses the same
    way (the configs alone: nothing is loaded)."""
    import json

    folders = {k: models[k] for k in ("base", "a", "b")}
    for name in folders if edit == "all" else [edit]:
        folders[name] = _edited_copy(models[name], tmp_path / name, **changes)
    width = json.loads((folders["base"] / "config.json").read_text())["intermediate_size"]
    message = message.replace("vs 64", f"vs {width}")
    flow = {
        "search_space": {
            "name": "per_layer",
            "data_flow": {"layers_from": ["merge", "a"], "scale": [0.5, 1.5]},
        }
    }
    config = write_config(tmp_path, folders, **(flow if edit == "all" else {}))
    outputs = {command: run_cli(command, config) for command in ("check", "run")}
    for command, (code, err) in outputs.items():
        assert code == 2 and err.startswith(f"error: {message}"), (command, err)
    assert outputs["check"] == outputs["run"]
    assert not (tmp_path / "run").exists()
