"""Item banks: IRT calibration paid once and reused by every run on the same items.

A bank is one file (``.npz``: numpy arrays and a JSON header, no pickles) holding, for one split of a set
of tasks:

- ``columns``: the items it knows, as (task, item id) with the id the fitness backend uses (lm-eval's
  doc index within the split);
- ``responses``: subjects x items, each entry the subject's score on the item, NaN where it was not
  evaluated;
- ``subjects``: the models those rows came from: an id (for the base and the experts, a content hash
  of their weight files; for a merge, a hash of its inputs' ids and its recipe), a label, and the genome
  and search-space hash of a merge a search produced (what sgpirt's surrogate learns from);
- ``fits``: per scope (a task, or ``mean``: every task's items together), the IRT model's item
  parameters, which items they cover, the fit settings and how many subjects they were fitted on.

``evomerge calibrate CONFIG`` builds one into the cache (``banks/``); a run with
``estimation.bank: auto`` finds the cached bank for its tasks' items (whatever models it was fitted on)
and pays no calibration; every whole-split evaluation a run makes is added to the bank's responses,
and ``evomerge bank refit`` fits its parameters again on all of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError

FORMAT = "evomerge.bank"
VERSION = 1
MIN_FIT_SUBJECTS = 6  # subjects with every item of a scope that a fit needs at least
Column = tuple[str, str]  # (task, item id)


def bank_dir(cache_dir: Path | None = None) -> Path:
    """Where cached banks live: ``$EVOMERGE_BANKS``, else ``<cache>/banks``."""
    from evomerge.cache import default_cache_dir

    env = os.environ.get("EVOMERGE_BANKS")
    return Path(env) if env else Path(cache_dir or default_cache_dir()) / "banks"


def bank_key(split: str, n_items: Mapping[str, int]) -> str:
    """The cached bank's name for these tasks' items of ``split``: the tasks, then a hash of the item counts."""
    tasks = sorted(n_items)
    digest = hashlib.sha256(json.dumps([split, [[t, n_items[t]] for t in tasks]]).encode()).hexdigest()
    name = "+".join(tasks)
    name = name if len(name) <= 60 else name[:57] + "..."
    return f"{name}.{split}.{digest[:12]}.npz".replace("/", "_")


@dataclass(frozen=True)
class Subject:
    """One row of a bank's responses: who answered."""

    id: str
    label: str
    genome: tuple[float, ...] | None = None
    space: str | None = None  # hash of the search space the genome belongs to
    source: str = ""  # the run folder or command that evaluated it

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["genome"] = None if self.genome is None else list(self.genome)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Subject:
        genome = data.get("genome")
        return cls(
            str(data["id"]),
            str(data.get("label", "")),
            None if genome is None else tuple(float(v) for v in genome),
            data.get("space"),
            str(data.get("source", "")),
        )


@dataclass
class Fit:
    """One scope's IRT parameters: over the bank columns ``cols`` (indices), fitted with ``settings``
    on ``n_subjects`` subjects; ``linked``: how many of its items were linked to the rest (their
    parameters fitted with the others' fixed) rather than fitted jointly."""

    scope: str
    cols: np.ndarray
    params: Any  # evomerge.irt.IrtParams
    settings: dict[str, Any] = field(default_factory=dict)
    n_subjects: int | None = 0  # None: fitted elsewhere on models this bank does not hold (an import)
    linked: int = 0


class ItemBank:
    """Responses and fitted item parameters for one split of a set of tasks (see the module docstring)."""

    def __init__(
        self,
        split: str,
        columns: Sequence[Column],
        responses: np.ndarray | None = None,
        subjects: Sequence[Subject] = (),
        fits: Mapping[str, Fit] | None = None,
        origin: str = "",
    ) -> None:
        self.split = split
        self.columns: list[Column] = [(str(t), str(i)) for t, i in columns]
        self.index = {c: j for j, c in enumerate(self.columns)}
        if len(self.index) != len(self.columns):
            raise EvomergeError("an item bank lists an item twice")
        n = len(self.columns)
        self.responses = (
            np.full((0, n), np.nan, dtype=np.float32)
            if responses is None
            else np.asarray(responses, np.float32)
        )
        self.subjects = list(subjects)
        self.fits: dict[str, Fit] = dict(fits or {})
        self.origin = origin  # how it was made: "calibrate", "run", "import tinybenchmarks", ...
        self.path: Path | None = None

    # --- what it covers -------------------------------------------------------------------------------
    @property
    def tasks(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t, _ in self.columns:
            out[t] = out.get(t, 0) + 1
        return out

    def check_covers(self, n_items: Mapping[str, int], split: str, what: str) -> None:
        """Refuse a bank for another split, or one that lists items the run's tasks do not have (how
        many match is said); a bank of some of a task's items is fine: estimates are about them."""
        if split != self.split:
            raise EvomergeError(f"{what} is for split {self.split!r}; this run estimates on {split!r}")
        mine = [c for c in self.columns if c[0] in n_items]
        exist = sum(int(i) < n_items[t] for t, i in mine if i.isdigit())
        if not mine or exist < len(mine):
            raise EvomergeError(
                f"{what} does not match this run's items: {exist} of its {len(mine)} items of tasks "
                f"{sorted(n_items)} exist on split {split!r} ({', '.join(f'{t}: {n}' for t, n in n_items.items())}); "
                "build one for these items with `evomerge calibrate CONFIG` or use estimation.bank: auto"
            )

    def extend_columns(self, cols: Sequence[Column]) -> None:
        """Add items the bank does not list yet (no responses to them so far)."""
        new = [(str(t), str(i)) for t, i in cols if (str(t), str(i)) not in self.index]
        if not new:
            return
        self.columns += new
        self.index = {c: j for j, c in enumerate(self.columns)}
        pad = np.full((len(self.subjects), len(new)), np.nan, dtype=np.float32)
        self.responses = np.hstack([self.responses, pad])

    # --- responses ------------------------------------------------------------------------------------
    def add(self, subject: Subject, responses: Mapping[str, Mapping[str, float]]) -> bool:
        """Add a subject's per-item scores (task -> item id -> score); an id already present gets the
        items it lacked filled in. Items the bank does not list are ignored. True when anything changed."""
        row = np.full(len(self.columns), np.nan, dtype=np.float32)
        for task, items in responses.items():
            for item, value in items.items():
                j = self.index.get((str(task), str(item)))
                if j is not None and value is not None:
                    row[j] = float(value)
        if np.isnan(row).all():
            return False
        ids = [s.id for s in self.subjects]
        if subject.id in ids:
            k = ids.index(subject.id)
            missing = np.isnan(self.responses[k]) & ~np.isnan(row)
            if not missing.any():
                return False
            self.responses[k, missing] = row[missing]
            return True
        self.subjects.append(subject)
        self.responses = np.vstack([self.responses, row[None]])
        return True

    def matrix(self, cols: Sequence[Column]) -> tuple[np.ndarray, list[Subject]]:
        """The responses of the subjects that answered every one of ``cols``, and those subjects."""
        idx = [self.index[c] for c in cols]
        sub = self.responses[:, idx]
        keep = ~np.isnan(sub).any(axis=1)
        return sub[keep].astype(float), [s for s, k in zip(self.subjects, keep, strict=True) if k]

    def responses_of(self, subject_id: str, cols: Sequence[Column]) -> np.ndarray | None:
        """A subject's scores on ``cols``, or None when it is absent or lacks any of them."""
        for k, s in enumerate(self.subjects):
            if s.id == subject_id:
                row = self.responses[k, [self.index[c] for c in cols]]
                return None if np.isnan(row).any() else row.astype(float)
        return None

    # --- fitting ----------------------------------------------------------------------------------------
    def fit(self, scope: str, cols: Sequence[Column], model: str, seed: int) -> Fit:
        """Fit ``model`` on every subject that answered all of ``cols`` and keep it as ``scope``'s fit."""
        from evomerge import irt

        y, who = self.matrix(cols)
        if len(who) < MIN_FIT_SUBJECTS:
            raise EvomergeError(
                f"item bank {str(self.path)!r} has {len(who)} models with responses to every item of scope "
                f"{scope!r}; fitting IRT needs at least {MIN_FIT_SUBJECTS}: calibrate with more random merges"
            )
        params = irt.fit_irt(y, model=model, seed=seed)
        settings = {"model": model, "seed": seed, "fitter": "py-irt"}
        fit = Fit(scope, np.array([self.index[c] for c in cols]), params, settings, len(who))
        self.fits[scope] = fit
        return fit

    def refit(self, seed: int | None = None) -> list[str]:
        """Fit every scope again with its own settings on all the subjects now in the bank."""
        done = []
        for scope, fit in list(self.fits.items()):
            if fit.n_subjects is None:  # an imported fit: this bank does not hold what it was fitted on
                continue
            cols = [self.columns[j] for j in fit.cols]
            model = fit.settings.get("model", fit.params.model)
            self.fit(scope, cols, model, fit.settings.get("seed", 0) if seed is None else seed)
            done.append(scope)
        return done

    def link(self, scope: str) -> int:
        """Extend ``scope``'s fit to the bank's other items of the same tasks that enough models answered
        (at least ``MIN_FIT_SUBJECTS`` of those that answered every fitted item): their parameters are
        fitted with the fitted items' held fixed (:func:`evomerge.irt.link_items`), so the estimates of
        later runs can use them on the same scale. Returns how many items were linked."""
        from evomerge import irt

        fit = self.fits[scope]
        known = set(int(j) for j in fit.cols)
        tasks = {self.columns[j][0] for j in fit.cols}
        rows = ~np.isnan(self.responses[:, fit.cols]).any(axis=1)  # models with an ability on the fit
        candidates = [
            j
            for j, (t, _) in enumerate(self.columns)
            if t in tasks
            and j not in known
            and (~np.isnan(self.responses[rows, j])).sum() >= MIN_FIT_SUBJECTS
        ]
        if not candidates:
            return 0
        known_y = self.responses[rows][:, fit.cols].astype(float)
        new_y = self.responses[rows][:, candidates].astype(float)
        new = irt.link_items(fit.params, known_y, new_y)
        p = fit.params
        g = None if p.g is None else np.concatenate([p.g, new.g])
        kw = {} if g is None else {"g": g}
        fit.params = irt.IrtParams(
            p.model,
            np.vstack([p.a, new.a]),
            np.concatenate([p.b, new.b]),
            None,
            p.response_variance,
            p.irt_bias,
            **kw,
        )
        fit.cols = np.concatenate([fit.cols, np.asarray(candidates)])
        fit.linked += len(candidates)
        return len(candidates)

    # --- the file ---------------------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "split": self.split,
            "origin": self.origin,
            "columns": [list(c) for c in self.columns],
            "subjects": [s.to_json() for s in self.subjects],
            "fits": {
                scope: {
                    "params": {**f.params.to_dict(), "theta": None},
                    "settings": f.settings,
                    "n_subjects": f.n_subjects,
                    "linked": f.linked,
                }
                for scope, f in self.fits.items()
            },
        }

    def save(self, path: str | Path) -> Path:
        """Write the bank atomically (a temporary sibling renamed over ``path``): a reader never sees half
        a file, and a failed write leaves the old one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"cols_{k}": f.cols for k, f in enumerate(self.fits.values())}
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            header=np.frombuffer(json.dumps(self.header()).encode(), dtype=np.uint8),
            responses=self.responses,
            **arrays,
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> ItemBank:
        """Read a bank file; one that is not one (corrupted, truncated, another format) is refused in one
        line and left as it is."""
        path = Path(path)
        if not path.is_file():
            raise EvomergeError(f"item bank {str(path)!r} does not exist")
        what = f"item bank {str(path)!r}"
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(data["header"].tobytes().decode())
                if not isinstance(header, dict) or header.get("format") != FORMAT:
                    raise ValueError("it is not an evomerge item bank")
                if header.get("version") != VERSION:
                    raise ValueError(f"its version {header.get('version')} is not {VERSION}")
                responses = np.array(data["responses"], dtype=np.float32)
                cols = [np.array(data[f"cols_{k}"]) for k in range(len(header["fits"]))]
            columns = [tuple(c) for c in header["columns"]]
            if responses.shape != (len(header["subjects"]), len(columns)):
                raise ValueError(
                    f"its responses are {responses.shape}, its header lists "
                    f"{len(header['subjects'])} subjects x {len(columns)} items"
                )
            from evomerge.irt import IrtParams

            fits = {}
            for (scope, f), c in zip(header["fits"].items(), cols, strict=True):
                params = IrtParams.from_dict(f["params"])
                if params.n_items != len(c) or (len(c) and not 0 <= c.min() <= c.max() < len(columns)):
                    raise ValueError(f"its fit {scope!r} does not match its items")
                fits[scope] = Fit(
                    scope, c, params, f.get("settings", {}), f.get("n_subjects", 0), f.get("linked", 0)
                )
            bank = cls(
                header["split"],
                columns,
                responses,
                [Subject.from_json(s) for s in header["subjects"]],
                fits,
                header.get("origin", ""),
            )
        except EvomergeError as e:
            raise EvomergeError(f"{what} is not a valid bank: {e}") from None
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            EOFError,
            zipfile.BadZipFile,
            json.JSONDecodeError,
        ) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EvomergeError(
                f"{what} is corrupted or truncated ({reason}); rebuild it with `evomerge calibrate CONFIG` "
                "or import it again"
            ) from None
        bank.path = path
        return bank

    def summary_lines(self) -> list[str]:
        """What ``evomerge bank show`` prints."""
        tasks = ", ".join(f"{t} ({n} items)" for t, n in self.tasks.items())
        answered = (~np.isnan(self.responses)).sum()
        lines = [
            f"bank      {self.path or '(unsaved)'}",
            f"split     {self.split}; tasks: {tasks}",
            f"origin    {self.origin or 'unknown'}",
            f"subjects  {len(self.subjects)} models, {int(answered)} responses "
            f"({answered / max(self.responses.size, 1):.0%} of subjects x items)",
        ]
        for scope, f in self.fits.items():
            s = f.settings
            linked = f", {f.linked} linked" if f.linked else ""
            on = "elsewhere" if f.n_subjects is None else f"on {f.n_subjects} models"
            lines.append(
                f"fit       {scope}: {f.params.model}, {len(f.cols)} items{linked}, fitted {on} "
                f"({', '.join(f'{k}={v}' for k, v in s.items())})"
            )
        if not self.fits:
            lines.append("fit       none yet: `evomerge bank refit` fits one")
        return lines


# --- who a subject is -------------------------------------------------------------------------------------


def _fingerprint_cache(cache_dir: Path | None) -> Path:
    return bank_dir(cache_dir) / "fingerprints.json"


def check_bank_file(path: Path, scopes: Mapping[str, Sequence[str]], split: str) -> None:
    """Refuse, before anything runs, a bank file that cannot be read, holds other tasks than the
    estimated ``scopes`` (scope -> its tasks) need or another split, or whose fit of a scope was made on
    fewer than ``MIN_FIT_SUBJECTS`` models."""
    bank = ItemBank.load(path)
    tasks = {t for ts in scopes.values() for t in ts}
    have = set(bank.tasks)
    if not tasks <= have:
        raise EvomergeError(
            f"item bank {str(path)!r} holds tasks {sorted(have)}; this config estimates {sorted(tasks)} "
            f"({len(tasks & have)} of {len(tasks)} in the bank): build one with `evomerge calibrate CONFIG` "
            "or use estimation.bank: auto"
        )
    if bank.split != split:
        raise EvomergeError(
            f"item bank {str(path)!r} is for split {bank.split!r}; this config estimates on {split!r}"
        )
    for scope in scopes:
        fit = bank.fits.get(scope)
        if fit is not None and fit.n_subjects is not None and fit.n_subjects < MIN_FIT_SUBJECTS:
            raise EvomergeError(
                f"item bank {str(path)!r}: its fit for scope {scope!r} was made on {fit.n_subjects} models; "
                f"estimators need item parameters fitted on at least {MIN_FIT_SUBJECTS}: add models "
                f"(`evomerge calibrate CONFIG --out {path}`) or use estimation.bank: auto"
            )


def model_fingerprint(ref: str, cache_dir: Path | None = None) -> str:
    """A model's identity: the SHA-256 of its weight files' names and bytes for a local folder (cached by
    path, size and modification time, so a folder is read once), or ``hub:<id>`` for a hub id."""
    path = Path(ref)
    if not path.is_dir():
        return f"hub:{ref}"
    files = sorted(
        f
        for f in path.iterdir()
        if f.suffix in (".safetensors", ".bin", ".gguf", ".pt") or f.name == "config.json"
    )
    stamp = json.dumps([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache = _fingerprint_cache(cache_dir)
    known: dict[str, Any] = {}
    if cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
    key = str(path.resolve())
    if known.get(key, {}).get("stamp") == stamp:
        return known[key]["sha256"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    digest = h.hexdigest()
    known[key] = {"stamp": stamp, "sha256": digest}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache: the hash is computed again next time
    return digest


def merge_id(inputs: Mapping[str, str], recipe: Mapping[str, Any]) -> str:
    """A merged model's identity: its inputs' fingerprints (by role) and its recipe."""
    blob = json.dumps({"inputs": dict(sorted(inputs.items())), "recipe": recipe}, sort_keys=True)
    return "merge:" + hashlib.sha256(blob.encode()).hexdigest()


def space_id(description: Any) -> str:
    """The hash of a search space's description (its genes): genomes of equal hashes are comparable."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


def new_bank(split: str, n_items: Mapping[str, int], origin: str) -> ItemBank:
    return ItemBank(split, [(t, str(i)) for t, n in n_items.items() for i in range(n)], origin=origin)
