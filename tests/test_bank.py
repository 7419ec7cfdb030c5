"""Item banks: calibration paid once and reused. A first run calibrates a stratified sample sized to its
budget and starts the cached bank; a second run with that bank evaluates no calibration model and
scores with the same item parameters; runs add their whole-split evaluations; damaged or mismatched
banks are refused in one line before anything is stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from tiny import demo_irt_config

from evomerge.bank import MIN_FIT_SUBJECTS, ItemBank, Subject, bank_key, new_bank
from evomerge.cli import app
from evomerge.config import parse_config
from evomerge.errors import EvomergeError
from evomerge.search import Search
from evomerge.store import Store

TASKS = ("zoo_addition", "zoo_script", "zoo_reversal")
N_ITEMS = {t: 200 for t in TASKS}
OBJECTIVES = [
    {"name": "mean_accuracy", "of": "mean", "estimator": "pirt", "items": 12, "selection": "random"}
]


def config(zoo_dir: Path, out: Path, bank: str | Path = "auto") -> dict:
    data = demo_irt_config(zoo_dir, out, OBJECTIVES, {"name": "ga", "pop_size": 4, "generations": 2})
    data["fitness"]["calibration"] = {}  # auto: sized to the run
    data["estimation"] = {"bank": str(bank)}
    return data


def import_bank_cli(file, fmt, config, out, *options):
    return cli("bank", "import", file, "--format", fmt, "--config", config, "--out", out, *options)


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output.strip()


@pytest.fixture(scope="module")
def first(zoo_dir, tmp_path_factory, module_banks):
    """A first run with estimation.bank: auto: it calibrates and starts the cached bank."""
    ray = pytest.importorskip("ray")
    try:
        yield Search(parse_config(config(zoo_dir, tmp_path_factory.mktemp("first") / "run"))).run()
    finally:
        ray.shutdown()


def test_a_first_run_calibrates_a_sample_sized_to_its_budget_and_starts_the_bank(first, module_banks):
    cal = Store(first / "store.sqlite").candidates(kind="calibration")
    # pirt needs no surrogate: base, 3 experts and 4 random merges; the search makes 8 x 12 = 96 item
    # evaluations, so the sample is the smallest allowed: 100 items, stratified by task
    assert len(cal) == 8 and all(c.n_items == 99 and c.subset is not None for c in cal)
    assert {t: len(r) for t, r in cal[0].responses.items()} == {t: 33 for t in TASKS}
    bank = ItemBank.load(module_banks / bank_key("search", N_ITEMS))
    assert bank.split == "search" and bank.tasks == N_ITEMS
    assert bank.fits["mean"].n_subjects == 8 and len(bank.fits["mean"].cols) == 99
    # the calibration models, then the re-scored front on the whole split (the summary says how many)
    summary = json.loads((first / "summary.json").read_text())
    assert len(bank.subjects) == 8 + summary["bank"]["added"]
    assert json.loads((first / "irt" / "bank.json").read_text())["bank"] == str(bank.path)


def test_a_second_run_with_the_bank_pays_no_calibration(first, zoo_dir, module_banks, tmp_path):
    ray = pytest.importorskip("ray")
    path = tmp_path / "bank.npz"
    shutil.copy(module_banks / bank_key("search", N_ITEMS), path)
    before = ItemBank.load(path)
    try:
        data = {**config(zoo_dir, tmp_path / "run", bank=path), "seed": 1}  # another search, the same items
        second = Search(parse_config(data)).run()
    finally:
        ray.shutdown()
    store = Store(second / "store.sqlite")
    assert store.candidates(kind="calibration") == []  # the endpoints are in the bank already
    assert all(c.n_items <= 12 for c in store.candidates(kind="search"))
    a = json.loads((first / "irt" / "mean.json").read_text())
    b = json.loads((second / "irt" / "mean.json").read_text())
    assert a["a"] == b["a"] and a["b"] == b["b"]  # the same item parameters
    after = ItemBank.load(path)
    assert len(after.subjects) > len(before.subjects)  # its re-scored front joined the bank
    assert after.fits["mean"].n_subjects == before.fits["mean"].n_subjects  # refit is explicit
    code, out = cli("bank", "refit", path)
    assert code == 0 and f"fitted on {len(after.subjects)} models" in out
    code, out = cli("bank", "show", path)
    assert code == 0 and "zoo_addition (200 items)" in out and "fit       mean: 2pl, 99 items" in out


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage" * 50)


@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_a_damaged_bank_is_refused_and_left_as_it_is(tmp_path, zoo_dir, how):
    path = tmp_path / "bank.npz"
    bank = new_bank("search", N_ITEMS, "test")
    bank.add(Subject("s1", "base"), {"zoo_addition": {"0": 1.0}})
    bank.save(path)
    _damage(path, how)
    damaged = path.read_bytes()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config(zoo_dir, tmp_path / "run", bank=path)))
    for command in (["check", cfg], ["run", cfg], ["bank", "show", path], ["bank", "refit", path]):
        code, out = cli(*command)
        assert code == 2 and out.count("\n") == 0
        assert f"item bank {str(path)!r} is corrupted or truncated" in out
    assert path.read_bytes() == damaged and not (tmp_path / "run").exists()


def test_a_bank_for_other_tasks_or_split_is_refused_with_what_matches(tmp_path, zoo_dir):
    path = tmp_path / "bank.npz"
    new_bank("search", {"zoo_addition": 200, "arc_easy": 50}, "test").save(path)
    with pytest.raises(
        EvomergeError,
        match=r"holds tasks \['arc_easy', 'zoo_addition'\]; this config "
        r"estimates \['zoo_addition', 'zoo_reversal', 'zoo_script'\] \(1 of 3 in the bank\)",
    ):
        parse_config(config(zoo_dir, tmp_path / "run", bank=path))
    new_bank("test", N_ITEMS, "test").save(path)
    with pytest.raises(EvomergeError, match="is for split 'test'; this config estimates on 'search'"):
        parse_config(config(zoo_dir, tmp_path / "run", bank=path))


def test_a_bank_for_other_items_is_refused_before_the_run_folder_exists(tmp_path, zoo_dir):
    pytest.importorskip("ray")
    import ray

    path = tmp_path / "bank.npz"
    new_bank("search", {"zoo_addition": 200, "zoo_script": 250, "zoo_reversal": 200}, "test").save(path)
    cfg = parse_config(config(zoo_dir, tmp_path / "run", bank=path))
    try:
        with pytest.raises(
            EvomergeError, match=r"does not match this run's items: 600 of its 650 items of tasks"
        ):
            Search(cfg).run()
    finally:
        ray.shutdown()
    assert not (tmp_path / "run").exists()
    data = config(zoo_dir, tmp_path / "run", bank=path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    code, out = cli("check", tmp_path / "c.yaml")  # check refuses it with run's line
    assert code == 2 and "does not match this run's items: 600 of its 650 items of tasks" in out
    assert out.count("\n") == 0 and not (tmp_path / "run").exists()


def test_a_bank_fitted_on_too_few_models_is_refused(tmp_path, zoo_dir):
    path = tmp_path / "bank.npz"
    bank = new_bank("search", N_ITEMS, "test")
    rng = np.random.default_rng(0)
    cols = bank.columns
    for k in range(MIN_FIT_SUBJECTS):
        bank.add(
            Subject(f"s{k}", f"m{k}"),
            {t: {i: float(rng.random() < 0.5) for tt, i in cols if tt == t} for t in TASKS},
        )
    fit = bank.fit("mean", cols, "2pl", 0)
    fit.n_subjects = 3  # as a bank fitted on three models says
    bank.save(path)
    with pytest.raises(EvomergeError, match=r"fit for scope 'mean' was made on 3 models; estimators need"):
        parse_config(config(zoo_dir, tmp_path / "run", bank=path))


def test_banks_round_trip_and_add_fills_in(tmp_path):
    bank = new_bank("search", {"t": 3}, "test")
    assert bank.add(Subject("m", "base", (0.5, 0.25), "space"), {"t": {"0": 1.0, "9": 1.0}})
    assert not bank.add(Subject("m", "base"), {"t": {"0": 1.0}})  # nothing new
    assert bank.add(Subject("m", "base"), {"t": {"2": 0.0}})  # fills in what it lacked
    bank.save(tmp_path / "b.npz")
    again = ItemBank.load(tmp_path / "b.npz")
    assert again.subjects == bank.subjects and again.columns == [("t", "0"), ("t", "1"), ("t", "2")]
    np.testing.assert_array_equal(again.responses, [[1.0, np.nan, 0.0]])


# --- public banks ---------------------------------------------------------------------------------------


def _tinybenchmarks_file(path: Path, sizes: dict[str, int]) -> Path:
    import pickle

    rng = np.random.default_rng(0)
    n = sum(sizes.values())
    positions, start = {}, 0
    for name, k in sizes.items():
        positions[name] = np.arange(start, start + k)
        start += k
    data = {
        "lb": {
            "irt_parameters": {"A": rng.random((1, 2, n)), "B": rng.normal(size=(1, 2, n))},
            "scenarios_position": positions,
        }
    }
    path.write_bytes(pickle.dumps(data))
    return path


def _atlas_file(path: Path, ids: list[int]) -> Path:
    rng = np.random.default_rng(1)
    rows = ['"X","a1","d","g","u"'] + [
        f'"X{i}",{rng.random() * 3:.4f},{rng.normal():.4f},{rng.random() * 0.3:.4f},1' for i in ids
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def addition_config(tmp_path, zoo_dir):
    data = config(zoo_dir, tmp_path / "run")
    data["fitness"]["tasks"] = ["zoo_addition"]
    data["objectives"] = [{"name": "addition", "of": "zoo_addition", "estimator": "pirt", "items": 12}]
    path = tmp_path / "addition.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_tinybenchmarks_and_atlas_banks_import_for_a_task(tmp_path, addition_config):
    tb = _tinybenchmarks_file(tmp_path / "tiny.pkl", {"harness_a": 200, "harness_b": 250})
    out = tmp_path / "bank.npz"
    code, text = import_bank_cli(
        tb, "tinybenchmarks", addition_config, out, "--scenario", "harness_a", "--fitted-on", 400
    )
    assert code == 0, text
    bank = ItemBank.load(out)
    fit = bank.fits["zoo_addition"]
    assert fit.params.model == "multidim_2pl" and fit.params.dims == 2 and len(fit.cols) == 200
    assert fit.n_subjects == 400 and "fitted on 400 models" in text
    # the scenario's parameters, in the package's convention: p = sigmoid(sum_d A_d theta_d - B_d)
    import pickle

    raw = pickle.loads(tb.read_bytes())["lb"]["irt_parameters"]
    np.testing.assert_allclose(fit.params.a, raw["A"][0, :, :200].T)
    np.testing.assert_allclose(fit.params.b, raw["B"][0, :, :200].sum(axis=0))

    ids = [i for i in range(1, 201) if i % 7]  # ATLAS drops some items; ids are 1-based
    at = _atlas_file(tmp_path / "arc.csv", ids)
    out3 = tmp_path / "atlas.npz"
    code, text = import_bank_cli(at, "atlas", addition_config, out3)
    assert code == 0, text
    fit = ItemBank.load(out3).fits["zoo_addition"]
    assert fit.params.model == "3pl" and len(fit.cols) == len(ids) and fit.n_subjects is None
    assert [ItemBank.load(out3).columns[j] for j in fit.cols][:2] == [
        ("zoo_addition", "0"),
        ("zoo_addition", "1"),
    ]
    rows = list(__import__("csv").DictReader(at.read_text().splitlines()))
    assert fit.params.b[0] == pytest.approx(-float(rows[0]["d"])) and fit.params.g[0] == pytest.approx(
        float(rows[0]["g"])
    )


def test_a_public_bank_of_other_items_is_refused_with_how_many_match(tmp_path, addition_config):
    tb = _tinybenchmarks_file(tmp_path / "tiny.pkl", {"harness_a": 200, "harness_b": 250})
    out = tmp_path / "bank.npz"
    code, text = import_bank_cli(tb, "tinybenchmarks", addition_config, out, "--scenario", "harness_b")
    assert code == 2 and text == (
        f"error: {str(tb)!r} does not match task 'zoo_addition': 200 of its 250 items exist in the task "
        "(its 'search' split has 200 documents); import it for the task it was fitted on"
    )
    at = _atlas_file(tmp_path / "arc.csv", [1, 2, 500])
    code, text = import_bank_cli(at, "atlas", addition_config, out)
    assert code == 2 and "2 of its 3 items exist in the task" in text
    code, text = import_bank_cli(tb, "tinybenchmarks", addition_config, out)
    assert code == 2 and "holds scenarios ['harness_a', 'harness_b']: name the one for this task" in text
    assert not out.exists()


@pytest.mark.slow  # 10 s: a run; `python -m pytest -m slow -k imported_bank` (in .ci/run)
def test_a_run_on_an_imported_bank_pays_no_calibration(tmp_path, addition_config):
    pytest.importorskip("ray")
    import ray

    at = _atlas_file(tmp_path / "arc.csv", list(range(1, 201)))
    out = tmp_path / "atlas.npz"
    assert import_bank_cli(at, "atlas", addition_config, out)[0] == 0
    data = yaml.safe_load(addition_config.read_text())
    data["estimation"] = {"bank": str(out)}
    data["algorithm"] = {"name": "ga", "pop_size": 2, "generations": 1}
    try:
        run = Search(parse_config(data)).run()
    finally:
        ray.shutdown()
    store = Store(run / "store.sqlite")
    assert store.candidates(kind="calibration") == []
    assert all(c.n_items == 12 for c in store.candidates(kind="search"))
    assert json.loads((run / "irt" / "zoo_addition.json").read_text())["model"] == "3pl"


@pytest.mark.slow  # 13 s: a calibration; `python -m pytest -m slow -k calibrate_builds` (in .ci/run)
def test_calibrate_builds_a_bank_and_no_run_folder(tmp_path, addition_config):
    pytest.importorskip("ray")
    out = tmp_path / "addition.npz"
    code, text = cli("calibrate", addition_config, "--out", out)
    assert code == 0, text
    bank = ItemBank.load(out)
    fit = bank.fits["zoo_addition"]  # the config's estimated scope; 200 items: all of them
    assert len(fit.cols) == 200 and fit.n_subjects == 8 and bank.origin == "calibrate"
    assert not (tmp_path / "run").exists()  # calibrating makes no run folder


def test_linking_fits_new_items_on_the_bank_scale():
    from evomerge.irt import simulate_2pl

    y, truth = simulate_2pl(40, 100, seed=3)
    bank = new_bank("search", {"t": 100}, "test")
    for k, row in enumerate(y):
        bank.add(Subject(f"m{k}", f"m{k}"), {"t": {str(i): float(v) for i, v in enumerate(row)}})
    bank.fit("mean", bank.columns[:60], "2pl", 0)
    assert bank.link("mean") == 40
    fit = bank.fits["mean"]
    assert fit.linked == 40 and len(fit.cols) == 100 and fit.params.n_items == 100
    b_true = truth.b[60:]
    assert np.corrcoef(fit.params.b[60:], b_true)[0, 1] > 0.8
    assert bank.link("mean") == 0  # nothing left to link
