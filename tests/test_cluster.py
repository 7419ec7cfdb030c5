"""Beyond one machine, on this one: a search on a multi-node Ray cluster that loses a node mid-run, and
`evomerge run --ray-address` against a `ray start --head` the test starts."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_search_engine import _cli, _count, models, ray_env, write_config  # noqa: F401

from evomerge.store import Store

ray = pytest.importorskip("ray")


def _workers(db: Path) -> set[str]:
    """The workers of the finished evaluations (read only: the run may not have made its store yet)."""
    if not db.exists():
        return set()
    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as con:
            return {w for (w,) in con.execute("SELECT worker FROM candidates WHERE worker IS NOT NULL")}
    except sqlite3.OperationalError:
        return set()


@pytest.mark.slow  # over 15 s: in .ci/run's slow list
def test_a_search_spread_over_nodes_finishes_when_a_node_is_removed(tmp_path, models, ray_env, monkeypatch):  # noqa: F811
    """Three nodes of one CPU each (the head has none), two workers of one CPU: each worker on a node of
    its own. One worker's node is removed mid-run; its evaluation is retried on a worker the third node
    starts, and the run ends with every candidate stored once."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    monkeypatch.setenv("EVOMERGE_TEST_SLEEP", "0.5")  # the nodes' workers inherit the test's environment
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 80 * 2**20, "include_dashboard": False},
    )
    try:
        nodes = [cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20) for _ in range(3)]
        cluster.wait_for_nodes()
        config = write_config(tmp_path, models, workers=2, retries=1, algorithm__generations=8)
        db = tmp_path / "run" / "store.sqlite"
        proc = _cli("run", config, "--out", tmp_path / "run", "--ray-address", cluster.address)
        deadline = time.time() + 300
        while time.time() < deadline and len(_workers(db)) < 2 and proc.poll() is None:
            time.sleep(0.2)
        used = {w.split(":")[1] for w in _workers(db)}
        assert len(used) == 2, (used, proc.poll() is not None and proc.stdout.read())  # one worker per node
        doomed = next(n for n in nodes if n.node_id[:8] in used)
        removed = time.time()
        cluster.remove_node(doomed)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    finally:
        cluster.shutdown()
    searched = Store(db).candidates(kind="search")
    assert all(c.status == "ok" for c in Store(db).candidates())  # none lost
    assert len({c.recipe_key for c in searched}) == len(searched)  # none evaluated twice
    late = [c for c in Store(db).candidates(kind="search") if c.created > removed]
    assert late, "the run searched nothing after the node was removed"
    after = {w.split(":")[1] for w in _workers(db)}
    assert doomed.node_id[:8] in after and len(after) == 3  # the third node took over


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 50 s, most of it Ray starting; `python -m pytest -m slow -k ray_start`
def test_evomerge_run_joins_a_cluster_started_with_ray_start(tmp_path, models, ray_env):  # noqa: F811
    ray.shutdown()
    port = _free_port()
    # A cluster started by hand; token authentication is the cluster owner's business, off here.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            f"--object-store-memory={100 * 2**20}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 120  # the head takes a while to listen on 2 cores
        while time.time() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        config = write_config(tmp_path, models, workers=2, algorithm__pop_size=4, algorithm__generations=2)
        proc = _cli("run", config, "--out", tmp_path / "run", "--ray-address", address, env=env)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        assert "Token authentication" not in out
    finally:
        os.killpg(head.pid, 15)
        head.wait(timeout=60)
    searched = Store(tmp_path / "run" / "store.sqlite").candidates(kind="search")
    assert searched and all(c.status == "ok" for c in searched)
    assert _count(tmp_path / "run" / "store.sqlite", "kind = 'reference'") == 3
