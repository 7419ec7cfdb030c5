"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


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
