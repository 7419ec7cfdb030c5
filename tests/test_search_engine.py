"""The search engine: algorithms by name, Python fitness, worker faults, and kill -9 / resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny import save_model_set

from evomerge.algorithms import ALGORITHMS, make_algorithm, setup
from evomerge.config import load_config
from evomerge.errors import EvomergeError
from evomerge.report import page as report_page
from evomerge.search import Search, resume_search
from evomerge.store import Store

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_model_set(tmp_path_factory.mktemp("models"), ["base", "a", "b"])


@pytest.fixture(scope="module")
def ray_env():
    """Ray workers import the test fitness functions from tests/."""
    ray = pytest.importorskip("ray")
    ray.shutdown()  # a Ray started earlier in the session would give its workers the old environment
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), old) if p)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


def write_config(root: Path, models, function="fitness_fns:closeness", **extra) -> Path:
    cfg = {
        "models": {"base": str(models["base"]), "experts": {"a": str(models["a"]), "b": str(models["b"])}},
        "search_space": {"name": "per_layer", "layer_groups": 2},
        "fitness": {"function": function},
        "objectives": [{"name": "first", "of": "first"}, {"name": "second", "of": "second"}],
        "algorithm": {"name": "nsga2", "pop_size": 6, "generations": 4},
        "workers": 1,
        "seed": 3,
    }
    for key, value in extra.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- algorithms --------------------------------------------------------------------------------------


def ask_tell(name: str, seed: int, generations: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Run algorithm ``name`` (population 6) by ask/tell on a 4-variable toy problem in [0, 1]^4 for
    ``generations`` generations from ``seed``; returns every generation's X and F, stacked in order."""
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem
    from pymoo.problems.static import StaticProblem

    n_obj = 1 if ALGORITHMS[name].objectives == "single" else 2
    problem = Problem(n_var=4, n_obj=n_obj, xl=0.0, xu=1.0)
    algorithm = setup(make_algorithm(name, 6, {}, n_obj), name, problem, generations, seed)
    xs, fs = [], []
    while algorithm.has_next():
        pop = algorithm.ask()
        X = pop.get("X")
        F = np.stack([((X - 0.3) ** 2).sum(1), ((X - 0.7) ** 2).sum(1)][:n_obj], axis=1)
        Evaluator().eval(StaticProblem(problem, F=F), pop)
        algorithm.tell(infills=pop)
        xs.append(X)
        fs.append(F)
    return np.concatenate(xs), np.concatenate(fs)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_ask_tell(name):
    """Each algorithm runs by ask/tell inside the bounds, and one seed gives the same X and F twice
    (pymoo's own determinism check)."""
    X, F = ask_tell(name, seed=0)
    assert X.shape[1] == 4 and np.all((X >= 0) & (X <= 1))
    assert len(X) >= 6
    X2, F2 = ask_tell(name, seed=0)
    np.testing.assert_array_equal(X2, X, err_msg=f"{name}: seed 0 twice, different X")
    np.testing.assert_array_equal(F2, F, err_msg=f"{name}: seed 0 twice, different F")


def test_any_pymoo_class_by_path():
    algorithm = make_algorithm("pymoo.algorithms.moo.spea2:SPEA2", 4, {}, 2)
    assert type(algorithm).__name__ == "SPEA2"
    with pytest.raises(EvomergeError, match="does not import"):
        make_algorithm("pymoo.algorithms.moo.nope:X", 4, {}, 2)


# --- Python fitness and faults ---------------------------------------------------------------------------


def test_a_run_whose_masks_this_version_draws_otherwise_is_not_resumed_or_reloaded(tmp_path, models, ray_env):
    from evomerge.merge.streams import KEYED_VERSION
    from evomerge.run import Run

    path = write_config(
        tmp_path,
        models,
        search_space__methods=["dare_ties"],
        search_space__genes={"weight": [0.0, 1.0], "density": [0.2, 1.0]},
    )
    cfg = load_config(
        path, out=str(tmp_path / "run"), **{"algorithm.pop_size": 2, "algorithm.generations": 1}
    )
    run = Search(cfg).run()
    store = Store(run / "store.sqlite")
    assert store.get_meta("keyed_stream") == KEYED_VERSION
    store.set_meta("keyed_stream", KEYED_VERSION - 1)  # as if an older evomerge had drawn its masks
    n = len(store.candidates())
    store.close()
    message = f"drew its dare_ties masks with keyed stream v{KEYED_VERSION - 1}; this evomerge draws v{KEYED_VERSION}"
    with pytest.raises(EvomergeError, match=message):
        resume_search(run).resume()
    with pytest.raises(EvomergeError, match=message):
        Run(run).load_model(Run(run).best_id)
    assert len(Store(run / "store.sqlite").candidates()) == n


def test_a_run_resumes_with_the_model_folders_it_started_with(tmp_path, monkeypatch, ray_env):
    from evomerge.zoos import tiny as zoo

    def zoo_at(root: Path, seed: int) -> Path:  # the layout of a built zoo: base/ and experts/<name>/
        made = save_model_set(root, ["base", "a", "b"], seed=seed)
        for e in ("a", "b"):
            (root / "experts").mkdir(exist_ok=True)
            made[e].rename(root / "experts" / e)
        return root

    old, new = zoo_at(tmp_path / "zoo-old", 0), zoo_at(tmp_path / "zoo-new", 1)
    refs = {"base": "zoo:base", "a": "zoo:a", "b": "zoo:b"}
    path = write_config(tmp_path, refs, **{"algorithm__pop_size": 2, "algorithm__generations": 1})
    cfg = load_config(path, out=str(tmp_path / "run"))
    monkeypatch.setattr(zoo, "build_zoo", lambda *a, **k: old)
    monkeypatch.setattr(zoo, "model_names", lambda: ["base", "a", "b"])
    run = Search(cfg).run()
    n = len(Store(run / "store.sqlite").candidates())

    monkeypatch.setattr(zoo, "build_zoo", lambda *a, **k: new)  # the zoo was rebuilt under a new recipe
    with pytest.raises(EvomergeError, match="was started with other model folders than this config's"):
        Search(cfg).resume()
    search = resume_search(run)
    assert search.models.base == str(old / "base")
    assert search.models.experts == {"a": str(old / "experts" / "a"), "b": str(old / "experts" / "b")}
    search.resume()
    assert len(Store(run / "store.sqlite").candidates()) == n

    shutil.rmtree(old / "experts" / "b")
    message = f"was started with model folder '{old / 'experts' / 'b'}', which no longer exists"
    with pytest.raises(EvomergeError, match=message):
        resume_search(run)


def test_groups_no_expert_changed_are_left_out_of_the_genome(tmp_path, ray_env):
    """Experts fine-tuned in their decoder layers only (as LoRA leaves embeddings and norms alone): the
    run's genome has no genes for the tensors outside the layers, and a resumed run keeps that layout."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = save_model_set(tmp_path / "models", ["base"])
    torch.manual_seed(1)
    for e in ("a", "b"):
        model = AutoModelForCausalLM.from_pretrained(paths["base"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".layers." in name:
                    p.add_(0.1 * torch.randn_like(p))
        paths[e] = tmp_path / "models" / e
        model.save_pretrained(paths[e])
        AutoTokenizer.from_pretrained(paths["base"]).save_pretrained(paths[e])
    cfg = load_config(
        write_config(tmp_path, paths, **{"algorithm__pop_size": 2, "algorithm__generations": 1}),
        out=str(tmp_path / "run"),
    )
    run = Search(cfg).run()
    store = Store(run / "store.sqlite")
    assert store.get_meta("changed_layers") == [0, 1, 2, 3]
    assert store.get_meta("genes") == [f"layers_{g}/{e}/weight" for g in ("0-1", "2-3") for e in "ab"]
    searched = store.candidates(kind="search")
    assert searched and all(len(c.genome) == 4 for c in searched)
    assert all(c.recipe["groups"][-1]["parameters"] == {"weight": {"a": 0.0, "b": 0.0}} for c in searched)
    store.close()
    search = resume_search(run)
    search.resume()
    assert search.space.inert == {"other"} and search.space.n_var == 4

    same = {"base": paths["base"], "a": paths["base"], "b": paths["base"]}  # nothing to merge
    cfg = load_config(write_config(tmp_path, same), out=str(tmp_path / "run-same"))
    for _ in range(2):  # the failed start leaves no run behind, so the second says the same
        with pytest.raises(EvomergeError, match="no expert differs from the base in any tensor"):
            Search(cfg).run()
    assert not (tmp_path / "run-same" / "store.sqlite").exists()


def test_the_first_population_can_start_from_the_experts(tmp_path, models, ray_env):
    cfg = load_config(
        write_config(tmp_path, models),
        out=str(tmp_path / "run"),
        **{"algorithm.initial": "experts", "algorithm.pop_size": 4, "algorithm.generations": 2},
    )
    search = Search(cfg)
    run = search.run()
    first = [c for c in Store(run / "store.sqlite").candidates(kind="search") if c.generation == 1]
    assert len(first) == 4
    for expert, cand in zip(["a", "b"], first, strict=False):
        assert cand.genome == search.space.expert_genome(expert).tolist()
        weights = {g["name"]: g["parameters"]["weight"] for g in cand.recipe["groups"]}
        assert all(w == {"a": float(expert == "a"), "b": float(expert == "b")} for w in weights.values())
    others = np.array([c.genome for c in first[2:]])
    assert np.all((others > 0) & (others < 1))  # the rest random


def test_python_fitness_with_responses(tmp_path, models, ray_env):
    cfg = load_config(write_config(tmp_path, models, "fitness_fns:with_responses"), out=str(tmp_path / "run"))
    run = Search(cfg).run()
    store = Store(run / "store.sqlite")
    search = store.candidates(kind="search")
    assert search and all(c.status == "ok" for c in search)
    assert all(set(c.responses) == {"probe"} and len(c.responses["probe"]) == 5 for c in search)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objectives"] == ["first", "second"] and summary["front"]


def test_callable_fitness_from_the_python_api(tmp_path, models, ray_env):
    import fitness_fns

    cfg = load_config(
        write_config(tmp_path, models, "fitness_fns:nan", objectives=[{"name": "loss", "direction": "min"}]),
        out=str(tmp_path / "run"),
        **{"algorithm.name": "ga", "algorithm.generations": 2, "algorithm.pop_size": 4},
    )
    run = Search(cfg, fitness=fitness_fns.loss).run()
    assert yaml.safe_load((run / "config.yaml").read_text())["fitness"]["function"] == "fitness_fns:loss"
    best = json.loads((run / "summary.json").read_text())["best"]["loss"]
    losses = [c.objectives["loss"] for c in Store(run / "store.sqlite").candidates(kind="search")]
    assert best <= max(losses) and all(np.isfinite(losses))


def test_a_dead_worker_is_replaced_and_its_candidate_retried(tmp_path, models, ray_env):
    marker = models["base"].parent / "crashed"
    cfg = load_config(
        write_config(tmp_path, models, "fitness_fns:crash_once", workers=2, retries=1),
        out=str(tmp_path / "run"),
        **{"algorithm.generations": 2, "algorithm.pop_size": 4},
    )
    run = Search(cfg).run()
    assert marker.exists()  # a worker process really died
    search = Store(run / "store.sqlite").candidates(kind="search")
    assert len(search) >= 4 and all(c.status == "ok" for c in search)


def test_nan_fitness_is_stored_as_failed_after_retries(tmp_path, models, ray_env):
    cfg = load_config(
        write_config(tmp_path, models, "fitness_fns:nan", objectives=[{"name": "m"}], retries=1),
        out=str(tmp_path / "run"),
        **{"algorithm.name": "ga", "algorithm.generations": 1, "algorithm.pop_size": 3},
    )
    with pytest.raises(EvomergeError, match="every evaluation so far failed with the same error") as err:
        Search(cfg).run()
    assert "\n" not in str(err.value) and "non-finite values for ['mean']" in str(err.value)
    rows = Store(tmp_path / "run" / "store.sqlite").candidates(kind="search")
    assert rows and all(c.status == "failed" and "non-finite" in c.error for c in rows)
    assert all("Traceback" in c.trace for c in rows)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_merge_with_non_finite_weights_is_refused(tmp_path, models, bad):
    """The worker refuses a merge that wrote NaN/inf anywhere (one element is enough), naming the tensor."""
    from safetensors.torch import load_file, save_file

    from evomerge.recipe import Recipe
    from evomerge.workers import Worker

    broken = tmp_path / "broken"
    shutil.copytree(models["b"], broken)
    weights = load_file(broken / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name].view(-1)[7] = bad
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    spec = {"base": str(models["base"]), "experts": {"a": str(models["a"]), "b": str(broken)}}
    worker = Worker({**spec, "tokenizer": None, "dtype": "float32"}, {"function": "fitness_fns:closeness"})
    recipe = Recipe.uniform("task_arithmetic", {"weight": [0.5, 0.5]})
    with pytest.raises(FloatingPointError, match=f"NaN/inf in tensor '{name}'"):
        worker.materialize(recipe)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("fitness_fns:not_a_number", "returned a non-number for 'mean': 'high' (str)"),
        (
            "fitness_fns:lacks_objective",
            "fitness returned no value 'mean' for objective 'm'; it returned: other",
        ),
    ],
)
def test_bad_fitness_output_stops_the_run_with_one_line(tmp_path, models, ray_env, function, message):
    cfg = load_config(
        write_config(tmp_path, models, function, objectives=[{"name": "m"}]),
        out=str(tmp_path / "run"),
        **{"algorithm.name": "ga", "algorithm.generations": 1, "algorithm.pop_size": 3},
    )
    with pytest.raises(EvomergeError) as err:
        Search(cfg).run()
    assert message in str(err.value) and "\n" not in str(err.value)


# --- kill -9 and resume --------------------------------------------------------------------------------


def _cli(*args, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def _rows(db: Path) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as con:
            return con.execute("SELECT generation FROM candidates WHERE kind = 'search'").fetchall()
    except sqlite3.OperationalError:
        return []


def _count(db: Path, where: str) -> int:
    """Finished rows that match ``where`` (0 while the store does not exist yet)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as con:
            return con.execute(
                f"SELECT count(*) FROM candidates WHERE status != 'pending' AND {where}"
            ).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _kill_when(proc: subprocess.Popen, db: Path, where: str, timeout: float = 240) -> str:
    """kill -9 the run's whole process group once a finished row matches ``where``; returns its output."""
    deadline = time.time() + timeout
    while time.time() < deadline and not _count(db, where) and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, f"the run ended before a row matched {where!r}"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    return proc.stdout.read()


def stored_ids(run: Path) -> list[tuple]:
    """Every stored evaluation by id: what it is and what was evaluated."""
    return [
        (c.id, c.kind, c.generation, c.label, c.split, c.subset, c.recipe_key, c.status)
        for c in Store(run / "store.sqlite").candidates(pending=True)
    ]


def same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same run: the same evaluations under the same ids, the same summary
    (but for its wall time), front and byte-identical best model."""
    assert stored_ids(a) == stored_ids(b)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for s in (sa, sb):
        s.pop("search_seconds")
        s.get("estimation", {}).get("cost", {}).pop("calibration_seconds", None)
        s.pop("bank", None)  # which bank the run grew: each run its own folder of banks
    assert sa == sb
    assert (a / "front.csv").read_text() == (b / "front.csv").read_text()

    def files(folder: Path) -> dict[str, bytes]:
        return {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
        }

    assert files(a / "best_model") == files(b / "best_model")


@pytest.fixture(scope="module")
def uninterrupted(models, ray_env, tmp_path_factory):
    """(config, run folder) of an uninterrupted CLI run with two workers: what the tests that stop a
    run and resume it compare with."""
    root = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(root, models, workers=2)
    full = _cli("run", config, "--out", root / "full")
    assert full.wait(timeout=300) == 0, full.stdout.read()
    return config, root / "full"


@pytest.mark.slow  # over 15 s: in .ci/run's slow list
def test_kill_9_mid_generation_and_during_the_test_evaluations_then_resume_reproduces_the_run(
    tmp_path, uninterrupted
):
    """Two workers finish in any order; killed twice and resumed, the run stores every evaluation under
    the id the uninterrupted run gave it and ends with the same front, best candidate and best model."""
    env = {**os.environ, "EVOMERGE_TEST_SLEEP": "0.2"}
    config, full = uninterrupted

    run_dir = tmp_path / "killed"
    db = run_dir / "store.sqlite"
    out = _kill_when(
        _cli("run", config, "--out", run_dir, env=env), db, "kind = 'search' AND generation >= 3"
    )
    assert re.search(
        r"^generation 2/4: best so far first [-\d.]+, second [-\d.]+; front \d+; 0 items evaluated; about ",
        out,
        re.M,
    ), out
    before = Store(db).candidates()
    assert before and not (run_dir / "summary.json").exists()
    # the report the run wrote after generation 2, and one built now: a stopped run (nothing else written)
    assert "running, generation 2 of 4" in (run_dir / "report.html").read_text()
    report_page.write_report(run_dir, tmp_path / "stopped.html")
    assert "stopped, generation 3 of 4" in (tmp_path / "stopped.html").read_text()
    out = _kill_when(_cli("resume", run_dir, "--quiet", env=env), db, "kind IN ('test', 'reference')")
    assert "generation" not in out and "memory plan" not in out, out
    assert not (run_dir / "summary.json").exists()
    resumed = _cli("resume", run_dir, env=env)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    after = {c.id: c for c in Store(db).candidates()}
    assert all(after[c.id].recipe_key == c.recipe_key for c in before)  # nothing rewritten
    searched = [c for c in after.values() if c.kind == "search"]
    assert len({c.recipe_key for c in searched}) == len(searched)  # nothing evaluated twice
    same_run(run_dir, full)
    assert "finished, generation 4 of 4" in (run_dir / "report.html").read_text()


def test_resume_refuses_another_config(tmp_path, models):
    run = tmp_path / "run"
    store = Store(run / "store.sqlite")
    cfg = load_config(write_config(tmp_path, models), out=str(run))
    from evomerge.search import stored_config

    store.set_meta("config", stored_config(cfg))
    store.close()
    other = load_config(write_config(tmp_path, models, seed=4), out=str(run))
    with pytest.raises(EvomergeError, match=r"belongs to another config \(differs in: seed\)"):
        resume_search(run, other)
    with pytest.raises(EvomergeError, match="is not a run folder"):
        resume_search(tmp_path / "nothing")
    # where it runs may change
    moved = load_config(write_config(tmp_path, models, workers=2), out=str(run))
    assert resume_search(run, moved).config.workers == 2


@pytest.mark.parametrize(
    ("name", "restart"), [("cmaes", "checkpoint"), ("cmaes", "replay"), ("bo", "checkpoint")]
)
def test_cmaes_and_bo_resume_from_their_checkpoint_or_by_replay(tmp_path, models, ray_env, name, restart):
    """Drop the last two generations' rows and the summary (as a crash there would), and their
    checkpoints (or every checkpoint: the algorithm then replays its generations, answered from the
    store); the resumed run re-evaluates only the dropped rows, runs every generation (pymoo's CMAES,
    resumed from its pickle, used to end one generation after the resume) and ends with the same front."""
    cfg = load_config(
        write_config(tmp_path, models, objectives=[{"name": "m", "of": "mean"}]),
        out=str(tmp_path / "run"),
        **{"algorithm.name": name, "algorithm.pop_size": 4, "algorithm.generations": 3},
    )
    run = Search(cfg).run()
    store = Store(run / "store.sqlite")
    rows = store.candidates(kind="search")
    last = max(c.generation for c in rows)
    summary = json.loads((run / "summary.json").read_text())
    store.db.execute("DELETE FROM candidates WHERE generation >= ? OR kind != 'search'", (last - 1,))
    keep = last - 2 if restart == "checkpoint" else 0
    store.db.execute("DELETE FROM checkpoints WHERE generation > ?", (keep,))
    store.close()
    (run / "summary.json").unlink()

    resume_search(run).resume()
    after = Store(run / "store.sqlite").candidates(kind="search")
    assert {c.generation for c in after} == {c.generation for c in rows} == {1, 2, 3}
    assert {c.recipe_key for c in after} == {c.recipe_key for c in rows}
    assert [c.id for c in after if c.generation < last - 1] == [c.id for c in rows if c.generation < last - 1]
    assert json.loads((run / "summary.json").read_text())["front"] == summary["front"]
