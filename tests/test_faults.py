"""Faults a run meets: hung or systematically failing evaluations, a full disk, damaged stores, an
unwritable run folder, SIGINT/SIGTERM; and checks that run before anything slow."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from test_search_engine import (  # noqa: F401
    _cli,
    _count,
    _rows,
    models,
    ray_env,
    same_run,
    stored_ids,
    uninterrupted,
    write_config,
)

from evomerge.cli import app
from evomerge.config import load_config
from evomerge.errors import EvomergeError
from evomerge.search import Search, resume_search
from evomerge.store import Store

ROOT = Path(__file__).resolve().parents[1]


def _short(tmp_path, models, function="fitness_fns:closeness", **extra):  # noqa: F811
    return load_config(
        write_config(tmp_path, models, function, **extra),
        out=str(tmp_path / "run"),
        **{"algorithm.pop_size": 4, "algorithm.generations": 2},
    )


# --- evaluations that hang or all fail -------------------------------------------------------------------


@pytest.mark.slow  # over 15 s: in .ci/run's slow list
def test_a_hanging_evaluation_times_out_and_its_worker_is_replaced(tmp_path, models, ray_env):  # noqa: F811
    marker = models["base"].parent / "hung"
    marker.unlink(missing_ok=True)
    cfg = load_config(
        write_config(tmp_path, models, "fitness_fns:hang_once", fitness__timeout=4, workers=1),
        out=str(tmp_path / "run"),
        **{"algorithm.pop_size": 3, "algorithm.generations": 1},
    )
    start = time.monotonic()
    run = Search(cfg).run()
    assert time.monotonic() - start < 120 and marker.exists()
    rows = Store(run / "store.sqlite").candidates(kind="search")
    failed = [c for c in rows if c.status == "failed"]
    assert len(failed) == 1 and failed[0].error == "timed out after 4 s"
    assert len({c.worker for c in rows if c.status == "ok"}) == 1  # the replacement did the rest
    assert failed[0].worker != next(c.worker for c in rows if c.status == "ok")


def test_timeout_auto_grows_from_the_first_evaluations():
    from evomerge.jobs import Job
    from evomerge.recipe import Recipe
    from evomerge.workers import FIRST_TIMEOUT_S, MIN_TIMEOUT_S, Timeouts

    t = Timeouts("auto")
    recipe = Recipe.uniform("task_arithmetic", {"weight": 0.0})
    subset, whole = Job(0, recipe, "search", {"t": [1]}), Job(1, recipe, "search", None)
    assert t.limit(subset) == FIRST_TIMEOUT_S
    t.finished(subset, 2.0)
    assert t.limit(subset) == MIN_TIMEOUT_S and t.limit(whole) == FIRST_TIMEOUT_S
    t.finished(subset, 30.0)
    assert t.limit(subset) == 300.0
    assert Timeouts(None).limit(subset) is None and Timeouts(7.5).limit(whole) == 7.5


@pytest.mark.slow  # over 15 s: in .ci/run's slow list
def test_a_run_whose_evaluations_all_fail_alike_stops_early_and_resumes_once_fixed(
    tmp_path,
    models,  # noqa: F811
    ray_env,  # noqa: F811
):
    (models["base"].parent / "fixed").unlink(missing_ok=True)
    cfg = load_config(
        write_config(tmp_path, models, "fitness_fns:broken_until_fixed", workers=2),
        out=str(tmp_path / "run"),
        **{"algorithm.pop_size": 4, "algorithm.generations": 3},
    )
    with pytest.raises(EvomergeError) as err:
        Search(cfg).run()
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        "every evaluation so far failed with the same error (4 of 4): "
        "RuntimeError: the fitness data is not there yet (candidate 1; whole trace: `evomerge show "
    )
    assert f"continue with `evomerge resume {tmp_path / 'run'}`" in message
    rows = Store(tmp_path / "run" / "store.sqlite").candidates(kind="search")
    assert len(rows) == 4  # the first generation, not the whole budget

    shown = CliRunner().invoke(app, ["show", str(tmp_path / "run"), "--candidate", "1"])
    assert shown.exit_code == 0
    assert "status failed" in shown.output and "Traceback (most recent call last)" in shown.output
    assert "RuntimeError: the fitness data is not there yet" in shown.output
    assert "layers_0-1" in shown.output  # the recipe
    missing = CliRunner().invoke(app, ["show", str(tmp_path / "run"), "--candidate", "99"])
    assert missing.exit_code == 2 and "has no candidate 99; its candidates: 1..4" in missing.output

    (models["base"].parent / "fixed").write_text("")
    resume_search(tmp_path / "run").resume()
    fresh = load_config(
        write_config(tmp_path, models, "fitness_fns:closeness", workers=2),
        out=str(tmp_path / "fresh"),
        **{"algorithm.pop_size": 4, "algorithm.generations": 3},
    )
    Search(fresh).run()
    assert [r[:-1] for r in stored_ids(tmp_path / "run")] == [r[:-1] for r in stored_ids(tmp_path / "fresh")]
    assert all(r[-1] == "ok" for r in stored_ids(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["front"] == json.loads((tmp_path / "fresh" / "summary.json").read_text())["front"]
    # what was found: the recipes of the best candidate and of each front member, and how it was picked
    best = Store(tmp_path / "run" / "store.sqlite").get(summary["best_candidate"])
    groups = {g["name"]: g for g in best.recipe["groups"]}
    assert set(summary["best_recipe"]) == set(groups) == {"layers_0-1", "layers_2-3", "other"}
    for name, g in groups.items():
        weights = summary["best_recipe"][name]["weight"]
        assert summary["best_recipe"][name]["method"] == g["method"] == "task_arithmetic"
        assert weights == {e: round(w, 4) for e, w in g["parameters"]["weight"].items()}
    assert all(set(f["recipe"]) == set(groups) for f in summary["front"])
    assert (
        summary["best_picked_on"] == "search values"
        and "lowest candidate id on ties" in summary["best_picked_how"]
    )
    front = CliRunner().invoke(app, ["front", str(tmp_path / "run")])
    assert front.exit_code == 0
    assert (
        f"candidate {summary['front'][0]['candidate']} recipe: layers_0-1: task_arithmetic weight a="
        in front.output
    )
    header = [line for line in front.output.splitlines() if "search_first" in line][0]
    assert (
        header.index("search_first")
        < header.index("search_second")
        < header.index("test_first")
        < header.index("test_second")
    )
    assert "best model: candidate" in front.output


# --- the run folder: full disk, damaged store, unwritable --out ----------------------------------------


@pytest.mark.slow  # over 15 s: in .ci/run's slow list
def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_afterwards(
    tmp_path,
    models,  # noqa: F811
    ray_env,  # noqa: F811
    monkeypatch,
):
    """SQLite's max_page_count gives the store the error a full disk gives (SQLITE_FULL)."""
    opened = Store.__init__
    room = {"pages": 3}

    def small_disk(self, path, readonly=False):
        opened(self, path, readonly)
        if not readonly:
            pages = self.db.execute("PRAGMA page_count").fetchone()[0]
            self.db.execute(f"PRAGMA max_page_count = {pages + room['pages']}")

    monkeypatch.setattr(Store, "__init__", small_disk)
    cfg = _short(tmp_path, models)
    with pytest.raises(EvomergeError) as err:
        Search(cfg).run()
    assert "\n" not in str(err.value)
    assert f"the disk holding run folder {str(tmp_path / 'run')!r} is full" in str(err.value)
    assert f"continue with `evomerge resume {tmp_path / 'run'}`" in str(err.value)
    stored = Store(tmp_path / "run" / "store.sqlite").candidates()
    assert all(c.objectives is not None and c.wall_s > 0 for c in stored)  # none half-stored

    monkeypatch.setattr(Store, "__init__", opened)
    resume_search(tmp_path / "run").resume()
    fresh = load_config(write_config(tmp_path, models), out=str(tmp_path / "fresh"))
    fresh = fresh.model_copy(update={"algorithm": cfg.algorithm})
    Search(fresh).run()
    assert stored_ids(tmp_path / "run") == stored_ids(tmp_path / "fresh")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "is truncated ("),
        ("garbage", "is not a SQLite database (overwritten?); it was left as it is"),
        ("corrupt", "is a damaged database"),
        ("foreign", "is a SQLite database that evomerge did not write (tables: notes)"),
    ],
)
def test_a_damaged_or_foreign_store_is_named_and_left_as_it_is(tmp_path, damage, message):
    import sqlite3

    run = tmp_path / "run"
    run.mkdir()
    path = run / "store.sqlite"
    if damage == "foreign":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE notes (x)")
    else:
        store = Store(path)
        for i in range(200):
            store.set_meta(f"k{i}", "v" * 500)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 3])
        elif damage == "garbage":
            path.write_bytes(b"\x00" * len(data))
        else:  # overwrite pages in the middle, keep the header
            path.write_bytes(data[:4096] + os.urandom(len(data) - 8192) + data[-4096:])
    before = path.read_bytes()
    for args in (
        ["resume", str(run)],
        ["show", str(run), "--candidate", "1"],
        ["export", str(run), "--candidate", "1"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)
    from evomerge.run import Run

    with pytest.raises(EvomergeError, match="it was left as it is"):
        Run(run)
    assert path.read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["store.sqlite"]


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write in: a read-only one, or (as root, which ignores permission
    bits) one on a file system that takes no new files."""
    if os.geteuid() == 0:
        return Path("/proc/sys/evomerge-run")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "run"


def test_an_unwritable_out_fails_in_one_line_before_anything_starts(tmp_path, models, ray_env):  # noqa: F811
    # ray_env: the CLI's process imports the config's fitness function from tests/ (PYTHONPATH)
    config = write_config(tmp_path, models)
    out = _unwritable(tmp_path)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "run", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and f"run folder {str(out)!r} is not writable" in proc.stderr
    assert time.monotonic() - start < 30  # no Ray, no model loading


def test_checks_before_anything_slow(tmp_path, models):  # noqa: F811
    """Bad task names, references and layer groups fail before a zoo is built or a model read; a
    model too large for the disk is found from its safetensors header."""
    runner = CliRunner()
    cache = tmp_path / "empty-cache"
    demo = yaml.safe_load((ROOT / "experiments" / "demo.yaml").read_text())
    demo["zoo"] = {"cache_dir": str(cache)}
    cases = [
        (
            {"fitness": {**demo["fitness"], "tasks": ["zoo_adition"]}},
            "unknown fitness task 'zoo_adition' (did you mean 'zoo_addition'?)",
        ),
        (
            {"models": {**demo["models"], "experts": {"a": "zoo:additon"}}},
            "unknown zoo model 'additon' (did you mean 'addition'?)",
        ),
        (
            {"search_space": {"name": "per_layer", "layer_groups": 50}},
            "search_space.layer_groups is 50 but the base model has 4 decoder layers; use at most 4 groups",
        ),
        (
            {"models": {**demo["models"], "base": str(tmp_path / "nowhere")}},
            f"base: model folder {str(tmp_path / 'nowhere')!r} does not exist",
        ),
    ]
    for edit, message in cases:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**demo, **edit}))
        for command in ("check", "run"):
            result = runner.invoke(app, [command, str(path), "--out", str(tmp_path / "run")])
            assert result.exit_code == 2 and message in result.output, (command, result.output)
    assert not cache.exists() and not (tmp_path / "run").exists()

    # a base whose one tensor claims 2^40 float32 elements in its safetensors header: 4 TiB to save
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text((models["base"] / "config.json").read_text())
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 0]}}).encode()
    (huge / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    config = write_config(tmp_path, {**models, "base": huge})
    result = runner.invoke(app, ["check", str(config), "--out", str(tmp_path / "run")])
    assert (
        result.exit_code == 2
        and "needs about 41943" in result.output
        and "MiB (store and best model) but" in result.output
    )
    ok = runner.invoke(app, ["check", str(write_config(tmp_path, models)), "--out", str(tmp_path / "run")])
    assert ok.exit_code == 0, ok.output


# --- signals and kill -9 ---------------------------------------------------------------------------------


@pytest.mark.slow  # over 15 s: in .ci/run's slow list
def test_sigterm_and_sigint_stop_cleanly_and_the_run_resumes_exactly(tmp_path, uninterrupted):  # noqa: F811
    """SIGTERM (kill, systemd, a scheduler) stops the run in its first generations; the resumed run gets
    Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends it) later on; resumed
    again, it ends as the uninterrupted run did."""
    config, full = uninterrupted
    env = {**os.environ, "EVOMERGE_TEST_SLEEP": "0.2"}
    run = tmp_path / "run"
    for sig, command, generation in (
        (signal.SIGTERM, ("run", config, "--out", run), 2),
        (signal.SIGINT, ("resume", run), 4),
    ):
        proc = _cli(*command, env=env)
        deadline = time.time() + 240
        while time.time() < deadline and not any(g >= generation for (g,) in _rows(run / "store.sqlite")):
            time.sleep(0.2)
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2, out
        assert out.strip().splitlines()[-1] == (
            f"error: stopped by {sig.name}: every finished evaluation is stored, the workers are stopped; "
            f"continue with `evomerge resume {run}`"
        )
        assert "Traceback" not in out and "Aborted" not in out
        assert "Token authentication" not in out  # Ray's banners are not the user's business
    # progress line by line where the output is not a terminal: the resumed run finished generation 3
    assert re.search(r"^generation 3/4: (\d+)/\1 \(\d+ s\)$", out, re.MULTILINE), out
    resumed = _cli("resume", run, env=env)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    same_run(run, full)


def test_a_run_folder_that_vanishes_mid_run_ends_in_one_line(tmp_path, models, ray_env):  # noqa: F811
    import shutil

    config = write_config(tmp_path, models, algorithm__pop_size=4, algorithm__generations=3)
    run = tmp_path / "run"
    proc = _cli("run", config, "--out", run, env={**os.environ, "EVOMERGE_TEST_SLEEP": "0.2"})
    deadline = time.time() + 240
    while time.time() < deadline and not _rows(run / "store.sqlite"):
        time.sleep(0.1)
    shutil.rmtree(run)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 2, out
    assert out.strip().splitlines()[-1] == (
        f"error: run folder {str(run)!r} vanished during the run (its store.sqlite is gone); "
        "what the run stored there is lost: start the run again"
    )


def test_an_interrupt_wrapped_by_compiled_code_still_stops_cleanly(tmp_path):
    """A signal handler's exception raised inside Ray's compiled ray.wait surfaces as a SystemError with
    the Interrupted as its context: still the resume line and exit 2, not a traceback."""
    from evomerge.cli import Interrupted, stoppable

    def wrapped():
        try:
            raise Interrupted("SIGINT")
        except Interrupted:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set")  # noqa: B904

    with pytest.raises(SystemExit) as done, stoppable(tmp_path / "run"):
        wrapped()
    assert done.value.code == 2
    with pytest.raises(SystemError), stoppable(tmp_path / "run"):  # a SystemError of its own goes on
        raise SystemError("something else")


@pytest.mark.slow  # about 5 minutes on 2 busy cores; `python -m pytest -m slow -k ctrl_c_at_random_moments`
def test_ctrl_c_at_random_moments_ends_in_one_line_and_the_run_resumes_exactly(
    tmp_path,
    models,  # noqa: F811
    ray_env,  # noqa: F811
):
    """Ctrl-C (SIGINT to the process group) at random moments of a short run: the program starting, Ray
    starting, models loading, evaluations and their store writes, the test split, the best model's export.
    Each ends with exit code 2 and one line, never a traceback. Where the run's store was made, the line
    says `evomerge resume RUN`, which then ends the run as the uninterrupted one ended; where it was not,
    the line says nothing was stored and names the same command, which then runs in that --out. Half the
    moments are drawn from the process's start over the uninterrupted run's span, half from the store's
    appearance over its evaluations (seeded and stratified: the same 8 moments each time); a moment that
    finds the run ended changes nothing (exit 0). Not covered: the interpreter's own first ~30 ms, before
    any evomerge code runs (Python's KeyboardInterrupt there)."""
    import random
    import shlex

    from evomerge.runfolder import RunFolder

    config = write_config(tmp_path, models, workers=2, algorithm__pop_size=4, algorithm__generations=2)
    slow = {**os.environ, "EVOMERGE_TEST_SLEEP": "0.4"}  # evaluations long enough to land in
    full = tmp_path / "full"
    start = time.monotonic()
    proc = _cli("run", config, "--out", full, env=slow)
    stored_at = ended_at = None  # when its store appeared, when it wrote summary.json
    while proc.poll() is None and ended_at is None:
        stored_at = stored_at or (time.monotonic() - start if RunFolder(full).exists() else None)
        ended_at = time.monotonic() - start if RunFolder(full).finished() else None
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and stored_at and ended_at, out
    rng = random.Random(21)
    trials, late, log = 8, 0, []
    for i in range(trials):
        from_store = i % 2 == 1
        span = (ended_at - stored_at) if from_store else ended_at
        moment = (i // 2 + rng.random()) * span / (trials // 2)  # stratified over the span
        run = tmp_path / f"trial{i}"
        command = ("run", str(config), "--out", str(run))
        proc = _cli(*command, env=slow)
        anchor = time.monotonic()
        while from_store and proc.poll() is None and not RunFolder(run).exists():
            time.sleep(0.01)
        anchor = time.monotonic() if from_store else anchor
        time.sleep(max(0.0, anchor + moment - time.monotonic()))
        phase = _phase(run) if proc.poll() is None else "ended"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
        what = (
            f"trial {i}: SIGINT {moment:.2f} s after {'the store appeared' if from_store else 'the start'} "
            f"({phase}): exit {proc.returncode}"
        )
        log.append(what)
        assert "Traceback" not in out and "Exception ignored" not in out and "Aborted" not in out, (
            f"{what}\n{out}"
        )
        if proc.returncode == 0:  # only a moment after the run ended leaves it as it was
            assert phase in ("finished", "ended"), f"{what}: the signal was lost\n{out}"
            late += 1
        else:
            assert proc.returncode == 2, f"{what}\n{out}"
            last = out.strip().splitlines()[-1]
            if RunFolder(run).exists():
                assert last == (
                    "error: stopped by SIGINT: every finished evaluation is stored, the workers are stopped; "
                    f"continue with `evomerge resume {run}`"
                ), f"{what}\n{out}"
                again = _cli("resume", run)
            else:
                assert last == (
                    f"error: stopped by SIGINT before anything was stored; run `{shlex.join(['evomerge', *command])}` again"
                ), f"{what}\n{out}"
                again = _cli(*command)
            out, _ = again.communicate(timeout=300)
            assert again.returncode == 0, f"{what}; then {again.args[3:]}:\n{out}"
        same_run(run, full)
        shutil.rmtree(run)
    print("\n".join(log))
    assert late <= 2, "\n".join(log)  # the moments aim inside the run


def _phase(run: Path) -> str:
    """Where a run is, read from its folder: before its store, a generation, the test split, finished."""
    if (run / "summary.json").exists():
        return "finished"
    db = run / "store.sqlite"
    if not db.exists():
        return "no store yet: the program, Ray or the models starting"
    if _count(db, "kind IN ('test', 'reference')"):
        return "test split"
    generations = [g for (g,) in _rows(db) if g is not None]
    return f"generation {max(generations)} under way" if generations else "store made, no evaluation yet"


def test_a_signal_while_ray_starts_is_handed_on_once_ray_init_returns():
    """Raised within ray.init, a handler's exception can leave a half-built CoreWorker that crashes the
    process as it exits (SIGSEGV, after the resume line): the signal waits for ray.init to return; a
    second one goes through at once."""
    from evomerge.workers import _signals_after_init

    seen = []

    def handler(signum, frame):
        seen.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _signals_after_init():  # what ray.init runs in
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            seen.append("ray.init returns")
        assert seen == ["ray.init returns", "SIGTERM"]
        with _signals_after_init():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            seen.append("ray.init returns")
        assert seen[2:] == ["SIGINT", "ray.init returns"]
        assert [signal.getsignal(s) for s in old] == [handler, handler]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
