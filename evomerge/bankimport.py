"""Public item banks made into evomerge banks: item parameters fitted once on leaderboard models.

- **tinyBenchmarks** (Polo et al., 2024): a multidimensional 2PL per benchmark, ``irt_parameters`` ``A``
  and ``B`` (1 x dims x items; p = sigmoid(sum_d A_d theta_d - B_d)) over the benchmark's items, and
  ``scenarios_position``: each scenario's item positions in that order, the scenario's k-th position
  being its k-th document (the Open LLM Leaderboard evaluated lm-eval's documents in order). Read from
  the package's pickle (only plain containers and numpy arrays are unpickled) or the same keys as JSON.
- **ATLAS** (Li et al., 2026): per benchmark a CSV of 3PL parameters from mirt, one row per item
  (``X<k>``: the k-th item, 1-based, of the benchmark's response matrix), ``a1``, ``d`` (intercept: p = g
  + (u - g) sigmoid(a1 theta + d)), ``g`` and ``u``; items the authors removed are absent.

Either way an item's id becomes the lm-eval document index of the task it is imported for, and the import
is refused, with how many items match, when any id does not exist in that task's split. The fit is kept
under the task's name: objectives ``of: <task>`` (or ``of: mean`` in a run of that task alone) use it.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.bank import Fit, ItemBank
from evomerge.errors import EvomergeError

FORMATS = ("tinybenchmarks", "atlas")


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles containers and numpy arrays only: a bank file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def _read_tinybenchmarks(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    try:
        loaded = json.loads(data) if path.suffix == ".json" else _PlainUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise EvomergeError(f"{str(path)!r} is not a tinyBenchmarks file: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise EvomergeError(f"{str(path)!r} is not a tinyBenchmarks file: it holds no mapping")
    return loaded


def tinybenchmarks(
    path: Path, benchmark: str | None, scenario: str | None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(a: items x dims, b: items, item ids) of one scenario of a tinyBenchmarks file."""
    data = _read_tinybenchmarks(path)
    if "irt_parameters" not in data:
        names = sorted(k for k, v in data.items() if isinstance(v, dict) and "irt_parameters" in v)
        if not names:
            raise EvomergeError(f"{str(path)!r} has no irt_parameters (not a tinyBenchmarks file)")
        if benchmark is None and len(names) > 1:
            raise EvomergeError(f"{str(path)!r} holds benchmarks {names}: name one with --benchmark")
        chosen = benchmark or names[0]
        if chosen not in names:
            raise EvomergeError(f"{str(path)!r} has no benchmark {chosen!r}; it holds {names}")
        data = data[chosen]
    params, positions = data["irt_parameters"], data.get("scenarios_position") or {}
    A = np.asarray(params["A"], dtype=float)
    B = np.asarray(params["B"], dtype=float)
    A = A.reshape(-1, A.shape[-1])  # dims x items
    B = B.reshape(-1, B.shape[-1])
    if not positions:
        raise EvomergeError(f"{str(path)!r} has no scenarios_position: which items belong to which task")
    if scenario is None:
        if len(positions) > 1:
            raise EvomergeError(
                f"{str(path)!r} holds scenarios {sorted(positions)}: name the one for this task with --scenario"
            )
        scenario = next(iter(positions))
    if scenario not in positions:
        raise EvomergeError(f"{str(path)!r} has no scenario {scenario!r}; it holds {sorted(positions)}")
    pos = np.asarray(positions[scenario], dtype=int)
    if pos.size == 0 or pos.max() >= A.shape[1]:
        raise EvomergeError(f"scenario {scenario!r} names items beyond the {A.shape[1]} parameters")
    a = A[:, pos].T
    b = B[:, pos].sum(axis=0) if B.shape[0] == A.shape[0] else B[0, pos]
    return a, b, list(range(len(pos)))


def atlas(path: Path, one_based: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """(a, b, g, item ids) of an ATLAS item-parameter CSV (mirt's ``a1, d, g, u``: b = -d)."""
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvomergeError(f"{str(path)!r} is not an ATLAS CSV: {e}") from None
    need = {"a1", "d", "g"}
    if not rows or not need <= set(rows[0]):
        have = sorted(rows[0]) if rows else []
        raise EvomergeError(f"{str(path)!r} is not an ATLAS CSV: it needs columns a1, d, g (it has {have})")
    key = next(iter(rows[0]))  # the first column names the item
    ids, a, d, g = [], [], [], []
    for row in rows:
        m = re.fullmatch(r"[A-Za-z_]*(\d+)", str(row[key]).strip())
        if m is None:
            raise EvomergeError(f"{str(path)!r}: item {row[key]!r} is not an item number (X<k>)")
        if "u" in row and row["u"] not in ("", None) and float(row["u"]) != 1.0:
            raise EvomergeError(f"{str(path)!r}: item {row[key]!r} has an upper asymptote u={row['u']} (4PL)")
        ids.append(int(m.group(1)) - (1 if one_based else 0))
        a.append(float(row["a1"]))
        d.append(float(row["d"]))
        g.append(float(row["g"]))
    if len(set(ids)) != len(ids):
        raise EvomergeError(f"{str(path)!r} lists an item twice")
    return np.asarray(a), -np.asarray(d), np.asarray(g), ids


def import_bank(
    path: Path,
    fmt: str,
    task: str,
    n_items: int,
    split: str,
    *,
    benchmark: str | None = None,
    scenario: str | None = None,
    fitted_on: int | None = None,
    into: ItemBank | None = None,
) -> ItemBank:
    """A bank (``into``, or a new one) with ``task``'s fit from a public bank file: its items become the
    task's documents 0..``n_items``-1 of ``split``; any id outside them refuses the whole import."""
    from evomerge.irt import IrtParams

    if fmt not in FORMATS:
        raise EvomergeError(f"unknown bank format {fmt!r}; formats: {', '.join(FORMATS)}")
    if not Path(path).is_file():
        raise EvomergeError(f"bank file {str(path)!r} does not exist")
    g = None
    if fmt == "tinybenchmarks":
        a, b, ids = tinybenchmarks(Path(path), benchmark, scenario)
        model = "2pl" if a.shape[1] == 1 else "multidim_2pl"
    else:
        a, b, g, ids = atlas(Path(path))
        model = "3pl"
    exist = sum(0 <= i < n_items for i in ids)
    if exist < len(ids):
        raise EvomergeError(
            f"{str(path)!r} does not match task {task!r}: {exist} of its {len(ids)} items exist in the task "
            f"(its {split!r} split has {n_items} documents); import it for the task it was fitted on"
        )
    params = IrtParams(model, a, b, g=g) if g is not None else IrtParams(model, a, b)
    cols = [(task, str(i)) for i in ids]
    bank = into if into is not None else ItemBank(split, [], origin=f"import {fmt}")
    if bank.split != split:
        raise EvomergeError(f"item bank is for split {bank.split!r}, not {split!r}")
    bank.extend_columns(cols)
    settings = {"source": fmt, "file": Path(path).name, **({"scenario": scenario} if scenario else {})}
    bank.fits[task] = Fit(task, np.array([bank.index[c] for c in cols]), params, settings, fitted_on)
    return bank
