"""The user cache, and folders built into it once: a build runs in a temporary sibling folder renamed into
place under a file lock, so that concurrent processes build a folder once and a killed build leaves nothing
that looks finished."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/evomerge``, or ``~/.cache/evomerge``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "evomerge"


def build_once(
    final: Path,
    build: Callable[[Path], None],
    force: bool = False,
    complete: Callable[[Path], bool] = Path.is_dir,
) -> Path:
    """``final``, made by ``build(tmp)`` into a temporary sibling folder renamed into place under a file
    lock: a build that fails leaves nothing behind, the folder of one killed outright (SIGKILL, power
    loss: no ``finally`` ran) is removed by the next call, and a process that waited for the lock reuses
    the result. ``complete(final)`` says whether an existing folder can be trusted."""
    final = Path(final)
    if complete(final) and not force and not _stale_builds(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in _stale_builds(final):  # no build writes them: every build of `final` holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        if complete(final) and not force:
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _stale_builds(final: Path) -> list[Path]:
    """The temporary folders of builds of ``final`` left behind: mkdtemp's exact names
    (``.{name}-`` and 8 characters), never those of another ``{name}-...`` folder's builds."""
    if not final.parent.is_dir():
        return []
    name = re.compile(rf"\.{re.escape(final.name)}-[a-z0-9_]{{8}}")
    return [p for p in final.parent.iterdir() if name.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
