"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def session_banks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Item banks (estimation.bank: auto) never go to the user's cache in tests: session fixtures' runs
    use a folder of the session's; modules and tests get their own (below)."""
    folder = tmp_path_factory.mktemp("banks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOMERGE_BANKS", str(folder))
        yield folder


@pytest.fixture(scope="module", autouse=True)
def module_banks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A module's shared runs use a folder of the module's own: one module's run must not find the bank
    another module's run made."""
    folder = tmp_path_factory.mktemp("banks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOMERGE_BANKS", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def private_banks(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """And each test's own runs to a folder of the test's own."""
    folder = tmp_path_factory.mktemp("banks")
    monkeypatch.setenv("EVOMERGE_BANKS", str(folder))
    return folder


@pytest.fixture
def registries():
    """The registries that examples and plugins add to, restored after the test: other tests see none
    of it."""
    from evomerge.fitness import BACKENDS
    from evomerge.irt import ESTIMATORS
    from evomerge.merge import METHODS
    from evomerge.methods import DECLARATIONS

    kept = [(r, dict(r._entries), dict(r._lazy)) for r in (METHODS, DECLARATIONS, ESTIMATORS, BACKENDS)]
    yield
    for r, entries, lazy in kept:
        r._entries.clear()
        r._entries.update(entries)
        r._lazy.clear()
        r._lazy.update(lazy)


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model zoo, built once into $EVOMERGE_TEST_CACHE or the user cache that the demo shares
    (the build is deterministic and keyed by its recipe hash, so sharing is safe)."""
    from evomerge.zoos.tiny import build_zoo

    cache = os.environ.get("EVOMERGE_TEST_CACHE")
    cache_dir = Path(cache) if cache else None
    return build_zoo(cache_dir, progress=False)


@pytest.fixture(scope="session")
def tiny_run(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny real run of the demo config (zoo models, lm-eval fitness, Ray workers): GA of
    4 x 2 generations on 20 items per task. Tests only read it."""
    pytest.importorskip("ray")
    from tiny import toy_run

    return toy_run("demo.yaml", zoo_dir, tmp_path_factory.mktemp("tiny_run") / "run", items=20)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: threads only add synchronisation (and timing noise on a shared machine). A module
    asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
