"""The notebook API (evomerge.load_run) on a tiny real run, and the example notebook executed end to end."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from nbclient import NotebookClient
from safetensors.torch import load_file

import evomerge
from evomerge.config import load_config
from evomerge.errors import EvomergeError
from evomerge.store import Candidate, Store

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "explore_run.ipynb"


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def run(run_dir):
    return evomerge.load_run(run_dir)


def test_candidates_match_the_store(run, run_dir):
    stored = Store(run_dir / "store.sqlite").candidates()
    df = run.candidates
    assert list(df.index) == [c.id for c in stored]
    assert list(df.columns) == [
        "kind",
        "generation",
        "label",
        "split",
        "status",
        "mean_accuracy",
        "test_mean_accuracy",
        "genome",
        "recipe",
        "recipe_key",
        "metrics",
        "n_items",
        "stopped",
        "n_tokens",
        "wall_s",
        "worker",
        "error",
    ]
    for c in stored:
        row = df.loc[c.id]
        assert (row.kind, row.label, row.split, row.status, row.recipe_key) == (
            c.kind,
            c.label,
            c.split,
            c.status,
            c.recipe_key,
        )
        assert pd.isna(row.generation) if c.generation is None else row.generation == c.generation
        assert row.mean_accuracy == c.objectives["mean_accuracy"]
        assert (row.genome, row.recipe, row.metrics) == (c.genome, c.recipe, c.metrics)
        assert (row.n_items, row.n_tokens, row.wall_s, row.worker) == (
            c.n_items,
            c.n_tokens,
            c.wall_s,
            c.worker,
        )
    # test-split scores sit on the search rows of the front, as in front.csv
    front_csv = pd.read_csv(run_dir / "front.csv").set_index("candidate")
    tested = df.test_mean_accuracy.dropna()
    assert set(tested.index) == set(front_csv.index)
    assert np.allclose(tested.loc[front_csv.index], front_csv.test_mean_accuracy)
    assert run.objectives[0].name == "mean_accuracy" and run.objectives[0].direction == "max"
    assert isinstance(run.config, evomerge.RunConfig) and run.config.algorithm.pop_size == 4


def test_pareto_front(run, run_dir):
    front = run.pareto_front()
    searched = run.candidates.query("kind == 'search' and status == 'ok'")
    assert set(front.index) == set(pd.read_csv(run_dir / "front.csv").candidate)
    assert (front.mean_accuracy == searched.mean_accuracy.max()).all()  # one objective: the best, ties kept
    assert run.best_id == json.loads((run_dir / "summary.json").read_text())["best_candidate"]


def test_history(run):
    h = run.history
    searched = run.candidates[run.candidates.kind == "search"]
    assert list(h.generation) == [1, 2]
    assert h.evaluated.sum() == len(searched) and (h.failed == 0).all()
    best = searched.groupby("generation").mean_accuracy.max()
    assert list(h.best_mean_accuracy) == list(best)
    assert list(h.cum_best_mean_accuracy) == list(best.cummax())
    assert h.cum_wall_s.iloc[-1] == pytest.approx(searched.wall_s.sum())


def test_plot_front(run):
    import matplotlib.pyplot as plt

    fig = run.plot_front()
    try:
        assert isinstance(fig, Figure)
        n_ok = len(run.candidates.query("kind == 'search' and status == 'ok'"))
        assert len(fig.axes[0].collections[0].get_offsets()) == n_ok
    finally:
        plt.close(fig)


def test_load_model_equals_saved_best_model(run, run_dir):
    model, tokenizer = run.load_model(run.best_id)
    assert not model.training and tokenizer.pad_token is not None
    saved = load_file(run_dir / "best_model" / "model.safetensors")
    merged = model.state_dict()
    assert set(saved) == set(merged)
    for name, tensor in saved.items():
        assert torch.equal(merged[name], tensor), name


def test_repr(run):
    text = repr(run)
    n = len(run.candidates)
    best = run.candidates.query("kind == 'search'").mean_accuracy.max()
    assert str(run.path) in text and f"{n} candidates" in text
    assert "mean_accuracy (max)" in text and f"mean_accuracy={best:.4g}" in text


def test_bad_inputs(run, tmp_path):
    n = run.candidates.index.max()
    with pytest.raises(EvomergeError, match=rf"has no candidate {n + 1}; its candidates: 1\.\.{n}$"):
        run.load_model(n + 1)
    with pytest.raises(EvomergeError, match=r"is not a run folder \(no store.sqlite\)"):
        evomerge.load_run(tmp_path)
    assert not (tmp_path / "store.sqlite").exists()


def test_reads_a_run_in_progress(run_dir, tmp_path):
    """The store is read in a snapshot while a writer holds its write lock (WAL)."""
    shutil.copy(run_dir / "store.sqlite", tmp_path / "store.sqlite")
    writer = sqlite3.connect(tmp_path / "store.sqlite", isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("DELETE FROM candidates WHERE kind != 'search'")
    try:
        before = evomerge.load_run(tmp_path).candidates
        writer.execute("COMMIT")
        after = evomerge.load_run(tmp_path).candidates
    finally:
        writer.close()
    assert set(before.kind) == {"search", "test", "reference"}
    assert set(after.kind) == {"search"} and after.test_mean_accuracy.isna().all()


def test_two_objectives_respect_directions(tmp_path):
    """A fake two-objective store: accuracy is maximised, cost minimised."""
    import matplotlib.pyplot as plt

    cfg = load_config(
        ROOT / "experiments" / "demo.yaml",
        objectives=[
            {"name": "accuracy", "of": "mean", "direction": "max"},
            {"name": "cost", "of": "zoo_addition", "direction": "min"},
        ],
        **{"algorithm.name": "nsga2"},
    )
    store = Store(tmp_path / "store.sqlite")
    store.set_meta("config", cfg.model_dump(mode="json"))
    points = {1: (0.5, 0.5), 2: (0.6, 0.7), 3: (0.4, 0.6), 4: (0.6, 0.4), 5: None, 6: (0.7, 0.9)}
    for i, values in points.items():
        store.add(
            Candidate(
                recipe={"groups": [{"name": "other", "method": "linear", "parameters": {"i": i}}]},
                recipe_key=f"k{i}",
                split="search",
                status="failed" if values is None else "ok",
                generation=1 if i <= 3 else 2,
                objectives=None if values is None else {"accuracy": values[0], "cost": values[1]},
                error="boom" if values is None else None,
                wall_s=1.0,
            )
        )
    store.close()
    run = evomerge.load_run(tmp_path)
    assert list(run.pareto_front().index) == [6, 4]  # 1, 2, 3 are dominated by 4; best accuracy first
    h = run.history.set_index("generation")
    assert list(h.failed) == [0, 1] and list(h.evaluated) == [3, 3]
    assert list(h.best_cost) == [0.5, 0.4] and list(h.best_accuracy) == [0.6, 0.7]
    assert "accuracy=0.7, cost=0.4" in repr(run)
    with pytest.raises(EvomergeError, match="does not record its model paths"):
        run.load_model(1)
    fig = run.plot_front()
    try:
        assert len(fig.axes) == 2  # the scatter and its generation colorbar
        assert len(fig.axes[0].collections[0].get_offsets()) == 5
        assert len(fig.axes[0].collections[1].get_offsets()) == 2  # the front
    finally:
        plt.close(fig)


def test_three_objectives_plot_a_scatter_matrix(tmp_path):
    """A fake three-objective store: plot_front draws every pair of objectives (none dropped), each
    coloured by generation with the front circled, and each objective per generation on the diagonal."""
    import matplotlib.pyplot as plt

    objectives = [
        {"name": "accuracy", "of": "mean", "direction": "max"},
        {"name": "cost", "of": "zoo_addition", "direction": "min"},
        {"name": "script", "of": "zoo_script", "direction": "max"},
    ]
    cfg = load_config(
        ROOT / "experiments" / "demo.yaml", objectives=objectives, **{"algorithm.name": "nsga2"}
    )
    store = Store(tmp_path / "store.sqlite")
    store.set_meta("config", cfg.model_dump(mode="json"))
    points = {
        1: (0.5, 0.5, 0.1),  # dominated by 4
        2: (0.6, 0.7, 0.2),
        3: (0.4, 0.6, 0.9),
        4: (0.6, 0.4, 0.1),
        5: None,
        6: (0.7, 0.9, 0.0),
    }
    for i, values in points.items():
        store.add(
            Candidate(
                recipe={"groups": [{"name": "other", "method": "linear", "parameters": {"i": i}}]},
                recipe_key=f"k{i}",
                split="search",
                status="failed" if values is None else "ok",
                generation=1 if i <= 3 else 2,
                objectives=None
                if values is None
                else dict(zip(("accuracy", "cost", "script"), values, strict=True)),
                error="boom" if values is None else None,
                wall_s=1.0,
            )
        )
    store.close()
    run = evomerge.load_run(tmp_path)
    assert sorted(run.pareto_front().index) == [2, 3, 4, 6]
    fig = run.plot_front()
    try:
        assert isinstance(fig, Figure)
        panels, colorbars = fig.axes[:9], fig.axes[9:]
        assert len(colorbars) == 1  # one generation colour bar for the whole matrix
        names = [o["name"] for o in objectives]
        for k, ax in enumerate(panels):
            i, j = divmod(k, 3)
            searched = ax.collections[0]
            assert len(searched.get_offsets()) == 5  # every successful candidate, in every panel
            assert list(searched.get_array()) == [1, 1, 1, 2, 2]  # coloured by generation
            if i == j:  # objective i per generation, with its running best
                assert ax.get_xlabel() == "generation" and ax.get_ylabel().startswith(names[i])
                assert len(ax.lines) == 1
            else:  # objective j against objective i, the front circled
                assert ax.get_xlabel().startswith(names[j]) and ax.get_ylabel().startswith(names[i])
                offsets = searched.get_offsets()
                assert list(offsets[:, 0]) == [points[c][j] for c in (1, 2, 3, 4, 6)]
                assert list(offsets[:, 1]) == [points[c][i] for c in (1, 2, 3, 4, 6)]
                assert len(ax.collections[1].get_offsets()) == 4
        pairs = {(p.get_xlabel().split()[0], p.get_ylabel().split()[0]) for p in panels}
        assert {(a, b) for a in names for b in names if a != b} <= pairs
    finally:
        plt.close(fig)
    _, ax = plt.subplots()
    try:
        with pytest.raises(EvomergeError, match="draws 3 objectives as a scatter matrix in a new figure"):
            run.plot_front(ax)
    finally:
        plt.close(ax.figure)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_notebook_runs(run_dir, monkeypatch):
    monkeypatch.setenv("EVOMERGE_RUN", str(run_dir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1  # plot_front, shown once
