"""The durable record of a run: SQLite (WAL) in the run folder, written as each candidate finishes.

A candidate's id is reserved (a ``pending`` row) before it is dispatched, in the order the run asks for
evaluations, so ids do not depend on which worker finishes first: a resumed run finds the reservations
of the evaluations it had asked for and fills the same ids. A finished ``ok`` row never changes; a
``failed`` row changes only when a run that stopped on a failure shared by every evaluation is resumed
(its evaluations are then retried under their ids). ``kind`` says why it was evaluated: ``search`` (a
genome the algorithm proposed), ``test`` (a re-evaluation on the test split), ``reference`` (base or an
expert), ``calibration``, ``full`` (a front member on the whole search split).
"""

from __future__ import annotations

import json
import pickle
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import cloudpickle

# The store's format. A run folder records the format it was written in (meta ``store_version``; stores
# from before the key have format 1); an evomerge refuses a store of a format newer than its own.
VERSION = 1


class _Value(str, Enum):
    """An enum whose members print as the strings the store holds."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Status(_Value):
    """How an evaluation ended; ``pending``: its id is reserved, it has not finished."""

    OK = "ok"
    FAILED = "failed"
    PENDING = "pending"


class Kind(_Value):
    """Why a model was evaluated."""

    SEARCH = "search"  # a genome the algorithm proposed, on its item subset
    CALIBRATION = "calibration"  # base, experts, random merges on the whole search split (IRT fitness)
    FULL = "full"  # a front member on the whole search split (IRT fitness)
    TEST = "test"  # a front member or the best on the test split
    REFERENCE = "reference"  # the base or an expert on the test split


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    generation INTEGER,
    label TEXT,
    split TEXT NOT NULL,
    subset TEXT,
    genome TEXT,
    recipe TEXT NOT NULL,
    recipe_key TEXT NOT NULL,
    status TEXT NOT NULL,
    objectives TEXT,
    metrics TEXT,
    responses TEXT,
    n_items INTEGER,
    n_tokens INTEGER,
    wall_s REAL,
    worker TEXT,
    error TEXT,
    created REAL NOT NULL,
    trace TEXT,
    stopped TEXT,
    outputs TEXT
);
CREATE INDEX IF NOT EXISTS candidates_key ON candidates (recipe_key, split, subset);
CREATE TABLE IF NOT EXISTS checkpoints (generation INTEGER PRIMARY KEY, state BLOB NOT NULL, created REAL NOT NULL);
"""


@dataclass
class Candidate:
    """One evaluated model. ``objectives`` are the configured objective values; ``metrics`` every value
    the fitness returned; ``responses`` per task the score of each item id evaluated (0/1 for accuracy
    and exact match); ``outputs`` per generative task what the model wrote for each item;
    ``subset`` a key of the items evaluated (None: the whole split)."""

    recipe: dict[str, Any]
    recipe_key: str
    split: str
    status: Status
    kind: Kind = Kind.SEARCH
    subset: str | None = None
    generation: int | None = None
    label: str | None = None
    genome: list[float] | None = None
    objectives: dict[str, float] | None = None
    metrics: dict[str, float] | None = None
    responses: dict[str, dict[str, float]] | None = None
    n_items: int = 0
    n_tokens: int = 0
    wall_s: float = 0.0
    worker: str | None = None
    error: str | None = None
    id: int | None = None
    created: float = field(default_factory=time.time)
    trace: str | None = None  # the whole traceback of a failed evaluation
    stopped: str | None = None  # why an adaptive test stopped (precise, max_items, raced, exhausted)
    outputs: dict[str, dict[str, str]] | None = None


_JSON = ("genome", "objectives", "metrics", "responses", "outputs")
_COLUMNS = [
    "kind",
    "generation",
    "label",
    "split",
    "subset",
    "genome",
    "recipe",
    "recipe_key",
    "status",
    "objectives",
    "metrics",
    "responses",
    "n_items",
    "n_tokens",
    "wall_s",
    "worker",
    "error",
    "created",
    "trace",
    "stopped",
    "outputs",
]
# Columns added after the first stores were written: older stores get them on open (NULL), and read
# as NULL where they are opened read-only.
_ADDED = {"trace": "TEXT", "stopped": "TEXT", "outputs": "TEXT"}


class StoreFullError(OSError):
    """The disk (or the database's size limit) is full: the write was rolled back whole."""


class Store:
    """The run's SQLite database. ``readonly=True`` opens an existing store for reading only (a run that
    is still writing it stays unaffected: WAL)."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            # A store without a write-ahead log beside it is not being written (a WAL writer keeps one
            # while it is open): read it as immutable, which leaves no -wal/-shm files in the run folder.
            wal = self.path.with_name(self.path.name + "-wal").exists()
            uri = f"{self.path.resolve().as_uri()}?mode=ro" + ("" if wal else "&immutable=1")
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        have = self._columns()
        for col, kind in _ADDED.items():
            if col not in have:
                self.db.execute(f"ALTER TABLE candidates ADD COLUMN {col} {kind}")

    def _columns(self) -> set[str]:
        return {row[1] for row in self.db.execute("PRAGMA table_info(candidates)")}

    def _select(self) -> str:
        """The SELECT list of a candidate row (a store from before a column was added reads it as NULL)."""
        have = self._columns()
        cols = [c if c not in _ADDED or c in have else "NULL" for c in _COLUMNS]
        return "SELECT id, " + ", ".join(cols) + " FROM candidates"

    def snapshot(self) -> tuple[dict[str, Any], list[Candidate]]:
        """Every meta value and every candidate, read in one transaction (a consistent view)."""
        self.db.execute("BEGIN")
        try:
            meta = {key: json.loads(value) for key, value in self.db.execute("SELECT key, value FROM meta")}
            return meta, self.candidates()
        finally:
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: all of it is stored or none (a full disk rolls it back)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:
            if "full" in str(e):
                raise StoreFullError(str(e)) from None
            raise

    def set_meta(self, key: str, value: Any) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    @staticmethod
    def _values(c: Candidate) -> list[Any]:
        values = []
        for col in _COLUMNS:
            v = getattr(c, col)
            if col in _JSON or col == "recipe":
                v = None if v is None else json.dumps(v, sort_keys=True)
            values.append(v)
        return values

    def add(self, c: Candidate) -> int:
        """Store a new row (``c.status`` ``pending`` reserves its id) and set ``c.id``."""
        with self._tx() as db:
            cur = db.execute(
                f"INSERT INTO candidates ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                self._values(c),
            )
        c.id = cur.lastrowid
        return c.id

    def finish(self, c: Candidate) -> None:
        """Fill the reserved (or retried failed) row ``c.id`` with the finished evaluation."""
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE candidates SET {', '.join(f'{col} = ?' for col in _COLUMNS)} "
                "WHERE id = ? AND status != 'ok'",
                [*self._values(c), c.id],
            )
            if cur.rowcount != 1:
                raise KeyError(f"candidate {c.id} is not reserved or already finished")

    def reserved(self, recipe_key: str, split: str, subset: str | None = None) -> int | None:
        """The id reserved for an evaluation of these weights on these items that has not finished."""
        row = self.db.execute(
            "SELECT id FROM candidates WHERE recipe_key = ? AND split = ? AND subset IS ? AND status = ? "
            "ORDER BY id LIMIT 1",
            (recipe_key, split, subset, Status.PENDING),
        ).fetchone()
        return row[0] if row else None

    def candidates(
        self, kind: str | None = None, split: str | None = None, pending: bool = False
    ) -> list[Candidate]:
        """Stored candidates by id; reservations whose evaluation has not finished only with ``pending``."""
        query, args = self._select() + " WHERE 1=1", []
        if not pending:
            query += " AND status != ?"
            args.append(Status.PENDING)
        if kind is not None:
            query += " AND kind = ?"
            args.append(kind)
        if split is not None:
            query += " AND split = ?"
            args.append(split)
        return [self._row(r) for r in self.db.execute(query + " ORDER BY id", args)]

    def get(self, candidate_id: int) -> Candidate:
        row = self.db.execute(self._select() + " WHERE id = ?", (candidate_id,)).fetchone()
        if row is None:
            raise KeyError(candidate_id)
        return self._row(row)

    def find(self, recipe_key: str, split: str, subset: str | None = None) -> Candidate | None:
        """The finished evaluation of these weights on these items, if any (a successful one first: a
        failed one was already retried, so it stands)."""
        row = self.db.execute(
            self._select() + " WHERE recipe_key = ? AND split = ? AND subset IS ? AND status != ? "
            "ORDER BY status != 'ok', id LIMIT 1",
            (recipe_key, split, subset, Status.PENDING),
        ).fetchone()
        return self._row(row) if row else None

    def _row(self, row: tuple[Any, ...]) -> Candidate:
        d = dict(zip(("id", *_COLUMNS), row, strict=True))
        for col in (*_JSON, "recipe"):
            if d[col] is not None:
                d[col] = json.loads(d[col])
        d["status"], d["kind"] = Status(d["status"]), Kind(d["kind"])
        return Candidate(**d)

    def save_checkpoint(self, generation: int, state: Any) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)",
                (generation, cloudpickle.dumps(state), time.time()),
            )

    def last_checkpoint(self) -> tuple[int, Any] | None:
        row = self.db.execute(
            "SELECT generation, state FROM checkpoints ORDER BY generation DESC LIMIT 1"
        ).fetchone()
        return (row[0], pickle.loads(row[1])) if row else None
