"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model zoo, built once per session into $EVOMERGE_TEST_CACHE (reused across runs) or a tmp dir."""
    from evomerge.zoo import build_zoo

    cache = os.environ.get("EVOMERGE_TEST_CACHE")
    cache_dir = Path(cache) if cache else tmp_path_factory.mktemp("evomerge-cache")
    return build_zoo(cache_dir, progress=False)
