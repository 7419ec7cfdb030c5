"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model zoo, built once into $EVOMERGE_TEST_CACHE or the user cache that the demo shares
    (the build is deterministic and keyed by its recipe hash, so sharing is safe)."""
    from evomerge.zoo import build_zoo

    cache = os.environ.get("EVOMERGE_TEST_CACHE")
    cache_dir = Path(cache) if cache else None
    return build_zoo(cache_dir, progress=False)
