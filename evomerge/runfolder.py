"""The run folder: the one place that knows its layout and opens its store.

```
RUN_DIR/store.sqlite   every evaluation, the run's meta, the algorithm checkpoints (evomerge.store)
RUN_DIR/config.yaml    the validated config
RUN_DIR/summary.json   the test-split table, the front and how the best model was picked
RUN_DIR/front.csv      the Pareto front with search and test values and recipes
RUN_DIR/best_model/    the best merge as an HF folder
RUN_DIR/irt/           fitted IRT item parameters, one file per objective scope
RUN_DIR/report.html    the run as a self-contained HTML page, rewritten after each generation
```

A store is checked before it is used: a file that is not SQLite (truncated, overwritten), a damaged
database, or a SQLite database that evomerge did not write is refused in one line and never changed.
Files other than the store are written whole or not at all (a temporary file renamed into place).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.store import VERSION, Store


class RunMeta:
    """A run's meta (the store's ``meta`` table) as typed fields; reading a field reads the store,
    ``update(**fields)`` writes it. Every field is read by someone: the run itself on resume, ``Run``,
    ``evomerge export``."""

    config: dict[str, Any] | None  # the validated config (stored_config): resume, Run
    models: dict[str, Any] | None  # the resolved model folders the run merged: resume, Run, export
    keyed_stream: int | None  # the version of the keyed mask stream: resume, Run.load_model
    changed_layers: list[int | None] | None  # layers some expert changes (the genome's layout): resume
    genes: list[str] | None  # the genome's gene names, in order: Run.genes
    search_seconds: float | None  # wall time of the search so far: resume (the summary's total)
    stopped_on: dict[str, Any] | None  # the failure every first evaluation shared: resume retries them
    running: dict[str, Any] | None  # the process running the run (host, pid); None once it stopped: report

    FIELDS = (
        "config",
        "models",
        "keyed_stream",
        "changed_layers",
        "genes",
        "search_seconds",
        "stopped_on",
        "running",
    )

    def __init__(self, store: Store):
        object.__setattr__(self, "_store", store)

    def __getattr__(self, name: str) -> Any:
        if name not in RunMeta.FIELDS:
            raise AttributeError(name)
        return self._store.get_meta(name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("use RunMeta.update(...)")

    def update(self, **fields: Any) -> None:
        unknown = set(fields) - set(RunMeta.FIELDS)
        if unknown:
            raise KeyError(f"not run meta fields: {sorted(unknown)}; fields: {', '.join(RunMeta.FIELDS)}")
        for name, value in fields.items():
            self._store.set_meta(name, value)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RunMeta.FIELDS}


STORE = "store.sqlite"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
FRONT = "front.csv"
BEST_MODEL = "best_model"
IRT = "irt"
REPORT = "report.html"
_TABLES = {"meta", "candidates", "checkpoints"}


def _format(value: str) -> int:
    """A stored store_version; one that is not a number is newer than any this evomerge knows."""
    try:
        return int(value)
    except ValueError:
        return VERSION + 1


class RunFolder:
    """A run folder at ``path`` (which may not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def store_path(self) -> Path:
        return self.path / STORE

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def best_model(self) -> Path:
        return self.path / BEST_MODEL

    @property
    def irt(self) -> Path:
        return self.path / IRT

    def exists(self) -> bool:
        """Whether a run was started here (it has a store)."""
        return self.store_path.is_file()

    def finished(self) -> bool:
        return (self.path / SUMMARY).is_file()

    def check_new(self) -> None:
        if self.exists():
            raise EvomergeError(
                f"run folder {str(self.path)!r} already holds a run; continue it with "
                f"`evomerge resume {self.path}` or choose another --out"
            )

    def require(self) -> None:
        """Refuse a folder without a store, or whose store is not a readable evomerge store."""
        if not self.path.is_dir():
            raise EvomergeError(f"{str(self.path)!r} is not a run folder (no such folder)")
        if not self.exists():
            raise EvomergeError(f"{str(self.path)!r} is not a run folder (no {STORE})")
        self._check_store()

    def _check_store(self) -> None:
        where = str(self.store_path)
        with open(self.store_path, "rb") as f:
            head = f.read(100)
        if head[:16] != b"SQLite format 3\x00":
            raise EvomergeError(f"{where!r} is not a SQLite database (overwritten?); it was left as it is")
        size = self.store_path.stat().st_size
        page = int.from_bytes(head[16:18], "big") if len(head) == 100 else 0
        pages = int.from_bytes(head[28:32], "big") if len(head) == 100 else 0
        expected = (65536 if page == 1 else page) * pages
        if len(head) < 100 or size < expected:
            raise EvomergeError(
                f"{where!r} is truncated ({size} of {expected or 'at least 100'} bytes); it was left as it is"
            )
        try:
            # Without a write-ahead log beside it (a store closed cleanly, or not a store) the file is
            # read as immutable, which leaves no -wal/-shm files beside a store it refuses.
            wal = self.store_path.with_name(STORE + "-wal").exists()
            uri = f"{self.store_path.resolve().as_uri()}?mode=ro" + ("" if wal else "&immutable=1")
            db = sqlite3.connect(uri, uri=True)
            try:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                check = db.execute("PRAGMA quick_check").fetchone()[0]
                version = (
                    db.execute("SELECT value FROM meta WHERE key = 'store_version'").fetchone()
                    if "meta" in tables
                    else None
                )
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            raise EvomergeError(f"{where!r} is a damaged database ({e}); it was left as it is") from None
        if check != "ok":
            raise EvomergeError(f"{where!r} is a damaged database ({check}); it was left as it is")
        if not tables >= _TABLES:
            raise EvomergeError(
                f"{where!r} is a SQLite database that evomerge did not write (tables: "
                f"{', '.join(sorted(tables)) or 'none'}); it was left as it is"
            )
        written = _format(version[0]) if version is not None else VERSION
        if written > VERSION:
            raise EvomergeError(
                f"{where!r} was written by a newer evomerge (store format {written}; this evomerge "
                f"reads up to {VERSION}): upgrade evomerge to open it; it was left as it is"
            )

    @staticmethod
    def meta(store: Store) -> RunMeta:
        """The typed meta of the run whose store is ``store``."""
        return RunMeta(store)

    def open_store(self, readonly: bool = False) -> Store:
        """The store of an existing run, checked first."""
        self.require()
        return Store(self.store_path, readonly=readonly)

    def create_store(self, **meta: Any) -> Store:
        """The store of a new run, holding ``meta`` (RunMeta fields; the folder is made). It appears whole:
        made under a temporary name and renamed into place, so a run stopped while its store is made
        leaves none behind (a store without the run's config could not be resumed, yet would refuse a new
        run in this folder)."""
        self.check_new()
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{STORE}-", dir=self.path)
        os.close(fd)
        try:
            store = Store(tmp)
            try:
                store.set_meta("store_version", VERSION)
                RunMeta(store).update(**meta)
            finally:
                store.close()  # the last connection: SQLite folds the write-ahead log into the file
            os.replace(tmp, self.store_path)
        finally:
            for leftover in (tmp, f"{tmp}-wal", f"{tmp}-shm"):
                Path(leftover).unlink(missing_ok=True)
        return Store(self.store_path)

    def write_text(self, name: str, text: str) -> Path:
        """Write ``name`` in the run folder whole or not at all."""
        path = self.path / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=self.path)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
