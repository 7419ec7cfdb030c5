"""The store: every candidate a record, written as it finishes, read back unchanged."""

from __future__ import annotations

import sqlite3

from evomerge.store import Candidate, Store


def test_round_trip_and_find(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    c = Candidate(
        recipe={"groups": []},
        recipe_key="k1",
        split="search",
        status="ok",
        generation=1,
        genome=[0.1, 0.9],
        objectives={"acc": 0.5},
        metrics={"acc": 0.5, "mean": 0.5},
        responses={"t": {"0": 1.0, "3": 0.0}},
        n_items=2,
        n_tokens=40,
        wall_s=0.2,
        worker="w",
    )
    cid = store.add(c)
    failed = Candidate(recipe={"groups": []}, recipe_key="k2", split="search", status="failed", error="boom")
    store.add(failed)
    got = store.get(cid)
    assert got.responses == {"t": {"0": 1.0, "3": 0.0}} and got.genome == [0.1, 0.9]
    assert store.find("k1", "search").id == cid
    assert store.find("k1", "test") is None
    assert store.find("k2", "search").status == "failed"  # already retried: it stands
    later = Candidate(recipe={"groups": []}, recipe_key="k2", split="search", status="ok")
    store.add(later)
    assert store.find("k2", "search").id == later.id  # a success wins over a failure
    assert [x.status for x in store.candidates()] == ["ok", "failed", "ok"]
    assert store.get(failed.id).error == "boom"
    store.close()


def test_wal_and_visible_to_other_connections(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.add(Candidate(recipe={}, recipe_key="k", split="search", status="ok"))
    other = sqlite3.connect(tmp_path / "s.sqlite")
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT count(*) FROM candidates").fetchone()[0] == 1


def test_checkpoints_keep_the_latest(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.save_checkpoint(1, {"gen": 1})
    store.save_checkpoint(2, {"gen": 2})
    assert store.last_checkpoint() == (2, {"gen": 2})
