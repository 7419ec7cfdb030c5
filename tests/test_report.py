"""The HTML report (``evomerge report``, RUN_DIR/report.html) and ``evomerge compare``: built from a tiny
finished run and from small stores, opened in a headless Chromium where one is installed, and refused
in one line for bad input. The report of a run stopped by kill -9 is built in
tests/test_search_engine.py, where that run is killed."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from browser import missing, open_pages
from click.testing import CliRunner

from evomerge.cli import app
from evomerge.config import load_config
from evomerge.report import compare as compare_page
from evomerge.report import figures, generation_line
from evomerge.report import page as report_page
from evomerge.run import Run
from evomerge.runfolder import RunFolder
from evomerge.store import Candidate

ROOT = Path(__file__).resolve().parents[1]
THREE = [
    {"name": "accuracy", "of": "mean", "direction": "max"},
    {"name": "addition", "of": "zoo_addition", "direction": "max"},
    {"name": "cost", "of": "zoo_script", "direction": "min"},
]


def fake_run(path: Path, objectives: list[dict], points: dict[int, tuple | None]) -> Path:
    """A run folder whose store holds search candidates with these objective values (None: failed),
    two per generation, and a config with these objectives (nsga2, per_layer_methods)."""
    cfg = load_config(
        ROOT / "experiments" / "demo.yaml",
        objectives=objectives,
        **{"algorithm.name": "nsga2", "search_space.name": "per_layer_methods"},
    )
    store = RunFolder(path).create_store()
    store.set_meta("config", cfg.model_dump(mode="json"))
    store.set_meta("genes", ["layers_0-1/method", "layers_0-1/a/weight", "layers_0-1/b/weight"])
    for i, values in points.items():
        groups = [
            {"name": "layers_0-1", "method": "ties", "parameters": {"weight": {"a": i / 10, "b": 0.5}}},
            {"name": "other", "method": "linear", "parameters": {"weight": {"a": 1.0, "b": 0.0}}},
        ]
        store.add(
            Candidate(
                recipe={"groups": groups},
                recipe_key=f"k{i}",
                split="search",
                status="failed" if values is None else "ok",
                generation=(i + 1) // 2,
                objectives=None
                if values is None
                else dict(zip([o["name"] for o in objectives], values, strict=True)),
                error="RuntimeError: boom\nmore" if values is None else None,
                n_items=30,
                wall_s=1.0,
                worker="w1",
            )
        )
    store.close()
    return path


@pytest.fixture
def three(tmp_path):
    points = {1: (0.5, 0.4, 3.0), 2: (0.6, 0.7, 2.0), 3: None, 4: (0.7, 0.5, 1.0), 5: (0.4, 0.9, 4.0)}
    return fake_run(tmp_path / "three", THREE, points)


def files(folder: Path) -> dict[str, str]:
    """Every file of a run folder but report.html, with a hash of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "report.html"
    }


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout.strip(), result.stderr.strip()


def test_the_finished_tiny_run_has_its_report_and_a_report_changes_nothing_else(tiny_run, tmp_path):
    written = (tiny_run / "report.html").read_text()  # by the run itself, last when it finished
    assert "finished, generation 2 of 2" in written and "Test split" in written
    before = files(tiny_run)
    code, out, err = cli("report", tiny_run, "--out", tmp_path / "again.html")
    assert code == 0 and out == str(tmp_path / "again.html"), err
    page = (tmp_path / "again.html").read_text()
    assert page.count('class="plotly-graph-div"') == 3  # front, progress, recipes
    assert cli("report", tiny_run)[0] == 0  # rewrites report.html only
    assert files(tiny_run) == before


def test_three_objectives_with_a_failure(three):
    run = Run(three)
    page = report_page.build_report(run)
    assert "stopped, generation 3 of 8" in page  # nothing records a live process
    assert "RuntimeError: boom" in page and f"evomerge show {three} --candidate 3" in page
    assert "layers_0-1 (ties)" in page  # the method is a gene of per_layer_methods
    assert "The test split is evaluated when the search ends" in page
    table = figures.progress_table(run)
    assert list(table.models_so_far) == [2, 4, 5] and list(table.best_so_far_cost) == [2.0, 1.0, 1.0]
    line = generation_line(run, 3, 8, 75)
    assert line == (
        "generation 3/8: best so far accuracy 0.7000, addition 0.9000, cost 1.0000; front 3; "
        "150 items evaluated; about 1 min 15 s left in the search"
    )


def test_bad_input_is_one_line_and_changes_nothing(three, tmp_path):
    code, _, err = cli("report", tmp_path / "nothing")
    assert code == 2 and err == f"error: {str(tmp_path / 'nothing')!r} is not a run folder (no such folder)"
    for out, message in (
        (tmp_path / "no" / "such" / "r.html", "cannot be written: No such file or directory"),
        (tmp_path, "is a folder; give a file name"),
    ):
        code, _, err = cli("report", three, "--out", out)
        assert code == 2 and message in err and "\n" not in err
    before = files(three)
    store = RunFolder(three).open_store()
    store.set_meta("store_version", 99)
    store.close()
    newer = files(three)
    code, _, err = cli("report", three)
    assert (
        code == 2 and "was written by a newer evomerge (store format 99; this evomerge reads up to 1)" in err
    )
    assert files(three) == newer != before and not (three / "report.html").exists()
    code, _, err = cli("show", three, "--candidate", "1")
    assert code == 2 and "newer evomerge" in err


def test_compare_refuses_other_objectives_and_needs_two_runs(three, tmp_path):
    two = fake_run(tmp_path / "two", THREE[:2], {1: (0.5, 0.4), 2: (0.6, 0.3)})
    code, _, err = cli("compare", three, two, "--out", tmp_path / "c.html")
    assert code == 2 and err == (
        "error: runs 'three' and 'two' have other objectives (differing: cost); compare runs of the same "
        "objectives"
    )
    code, _, err = cli("compare", three, "--out", tmp_path / "c.html")
    assert code == 2 and "needs two run folders or more" in err
    assert not (tmp_path / "c.html").exists()


def test_reports_render_in_a_headless_browser(tiny_run, three, tmp_path):
    """No console error, and every figure drawn with a non-zero size: the tiny run's report, the report
    of three objectives (a scatter matrix) and the comparison of two runs."""
    why = missing()
    if why:
        pytest.skip(f"no headless browser: {why}")
    other = fake_run(tmp_path / "other", THREE, {1: (0.55, 0.5, 2.5), 2: (0.65, 0.6, 1.5)})
    pages = [
        report_page.write_report(tiny_run, tmp_path / "tiny.html"),
        report_page.write_report(three, tmp_path / "three.html"),
        compare_page.write_compare([three, other], tmp_path / "compare.html"),
    ]
    expected = {"tiny": 3, "three": 3, "compare": 2}
    for page, seen in zip(pages, open_pages(pages, tmp_path), strict=True):
        assert seen["errors"] == [], (page.name, seen["errors"])
        assert len(seen["figures"]) == expected[page.stem], seen["figures"]
        for fig in seen["figures"]:
            assert fig["width"] > 0 and fig["height"] > 0 and fig["traces"] > 0, (page.name, fig)
        assert seen["screenshot"].stat().st_size > 10_000
        print(f"screenshot: {seen['screenshot']}")


def test_the_page_is_self_contained(three):
    """plotly.js is inlined whole; outside it the page loads nothing from anywhere."""
    from plotly.offline import get_plotlyjs

    page = report_page.build_report(Run(three))
    assert get_plotlyjs() in page
    own = page.replace(get_plotlyjs(), "")
    assert not re.search(r"src=|href=(?!\"#)|<link|@import|url\(", own)  # links within the page only


def test_the_read_side_loads_no_torch_and_the_engine_no_page():
    """Run, the terminal output and the pages import neither torch nor a merge kernel (evomerge front,
    show and report start fast); the engine (search, loop, summary, evaluations) imports no page."""
    import subprocess
    import sys

    code = (
        "import sys, evomerge.run, evomerge.report, evomerge.report.page, evomerge.report.compare; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('evomerge.merge', "
        "'evomerge.searchspace', 'evomerge.config'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    engine = (
        "import sys, evomerge.search, evomerge.loop, evomerge.summary, evomerge.evaluations; "
        "print(sorted(m for m in sys.modules if m.startswith(('evomerge.report.', 'evomerge.run'))))"
    )
    out = subprocess.run([sys.executable, "-c", engine], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['evomerge.report.terminal', 'evomerge.runfolder']", out.stdout


def test_progress_over_a_generation_with_no_rated_candidate(tmp_path):
    """A generation whose candidates all failed (or were all raced) rates nothing: the best so far and
    the candidate holding it carry over (found by the search-efficiency benchmark's adaptive runs)."""
    points = {1: (0.5, 0.1), 2: (0.6, 0.1), 3: None, 4: None, 5: (0.7, 0.1), 6: (0.4, 0.1)}
    path = fake_run(tmp_path / "run", THREE[:2], points)
    table = figures.progress_table(Run(path))
    assert list(table.best_so_far_accuracy) == [0.6, 0.6, 0.7]
    assert list(table.best_id_so_far_accuracy) == [2, 2, 5]
