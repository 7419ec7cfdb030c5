"""The run's IRT stage: where each estimated objective's item parameters come from (the run's own
``irt/`` folder on resume, ``calibration.params``, an item bank, or a calibration sized to the run, which
starts the cached bank) and the item subsets or adaptive tests the objectives are scored with. What a
calibration evaluates and the objects the scorer holds live in :mod:`evomerge.calibration`; the bank
file in :mod:`evomerge.bank`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from evomerge import irt
from evomerge.calibration import (
    DEFAULT_MAX_ITEMS,
    DEFAULT_TARGET_SE,
    AdaptiveObjective,
    Column,
    Scope,
    Subset,
    calibrate,
    calibration_items,
    check_held_out,
    columns,
    input_genome,
    random_merge_count,
    response_matrix,
    select,
)
from evomerge.errors import EvomergeError


def _scope_cols(n_items: dict[str, int], scope: str, sample: dict[str, list[int]] | None) -> list[Column]:
    cols = columns(n_items, scope)
    if sample is None:
        return cols
    keep = {(t, str(i)) for t, ids in sample.items() for i in ids}
    return [c for c in cols if c in keep]


def _items_of(cols: Sequence[Column]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for t, i in cols:
        out.setdefault(t, []).append(int(i))
    return {t: sorted(set(ids)) for t, ids in out.items()}


def prepare_estimators(
    evals: Any,
    space: Any,
    experts: list[str],
    config: Any,
    n_items: dict[str, int],
    folder: Path,
    inputs: dict[str, str] | None = None,
) -> dict[str, Subset | AdaptiveObjective]:
    """Each estimated objective's items, from saved IRT parameters (the run's ``irt/`` folder on resume,
    or ``calibration.params``), an item bank (``estimation.bank``), or a calibration sized to the run
    (which then starts the cached bank), with sgpirt's surrogate fitted on merges of this search space.
    ``inputs``: the fingerprints of the base and the experts by role (who they are in a bank)."""
    cal = config.fitness.calibration
    objectives = config.objectives
    for o in objectives:  # before anything is evaluated
        n = len(columns(n_items, o.of))
        if o.items == "adaptive" and (o.max_items or 0) > n:
            raise EvomergeError(
                f"objective {o.name!r}: max_items={o.max_items} exceeds the {n} items of {o.of!r}"
            )
    names = list(dict.fromkeys(o.of for o in objectives if o.estimator))
    saved = Path(cal.params or folder)
    scopes: dict[str, Scope | None] = {
        name: Scope.load(saved, name, columns(n_items, name)) for name in names
    }
    stage = IrtStage(evals, space, experts, config, n_items, folder, inputs or {})
    if any(sc is None for sc in scopes.values()):
        if cal.params is not None:
            missing = [name for name, sc in scopes.items() if sc is None]
            raise EvomergeError(f"calibration.params {str(cal.params)!r} has no parameters for {missing}")
        scopes = stage.fit_scopes(names)
    surrogate = {o.of for o in objectives if o.estimator and irt.get_estimator(o.estimator).needs_prior}
    for name in surrogate:
        stage.fit_surrogate(scopes[name])
    out: dict[str, Subset | AdaptiveObjective] = {}
    for o in objectives:
        if not o.estimator:
            continue
        scope = scopes[o.of]
        if o.items != "adaptive":
            out[o.name] = select(o.name, scope, o.items, o.selection, o.estimator, config.seed)
            continue
        max_items = o.max_items or min(DEFAULT_MAX_ITEMS, len(scope.cols))
        target = o.target_se or DEFAULT_TARGET_SE
        check = None
        if cal.params is None:  # held-out subjects: the calibration's or the bank's
            responses = stage.held_out(scope)
            if len(responses) >= 4:
                check = check_held_out(scope, responses, target, max_items, cal.model, config.seed, folder)
        out[o.name] = AdaptiveObjective(o.name, scope, o.estimator, target, max_items, check)
    stage.save_bank()
    return out


@dataclass
class IrtStage:
    """How a run gets its item parameters: from an item bank where one covers its items, else from a
    calibration of its own, which starts (or extends) the cached bank."""

    evals: Any
    space: Any
    experts: list[str]
    config: Any
    n_items: dict[str, int]
    folder: Path
    inputs: dict[str, str]
    bank: Any = None  # evomerge.bank.ItemBank, or None: estimation.bank is none
    evaluated: list[Any] = field(default_factory=list)  # this run's calibration evaluations
    changed: bool = False
    origin: str = "run"  # what a new bank says made it

    def __post_init__(self) -> None:
        from evomerge.store import Kind, Status

        self.bank = open_bank(self.config, self.n_items, self.origin)
        if self.evals is not None:  # what an earlier start of this run calibrated (reused, never redone)
            stored = self.evals.store.candidates(kind=Kind.CALIBRATION)
            self.evaluated = [c for c in stored if c.status == Status.OK]

    @property
    def space_id(self) -> str:
        from evomerge.bank import space_id

        return space_id(self.space.describe())

    def fit_scopes(self, names: Sequence[str], refit: bool = False) -> dict[str, Scope]:
        """Each scope's parameters: the bank's fit where it has one (unless ``refit``), else fitted on a
        calibration of the run's own (sized by ``calibration.items`` and ``random_merges``), into the
        bank when there is one; saved in the run's ``irt/`` folder."""
        cal, seed = self.config.fitness.calibration, self.config.seed
        n_models = 1 + len(self.experts) + random_merge_count(self.config)
        sample = calibration_items(self.config, self.n_items, n_models)
        every = _scope_cols(self.n_items, "mean", sample)  # what a calibration of its own evaluates
        calibrated: list[Any] = []
        scopes: dict[str, Scope] = {}
        for name in names:
            fit = None if refit else self._bank_fit(name)
            if fit is not None:
                cols = [self.bank.columns[j] for j in fit.cols]
                scopes[name] = Scope(name, cols, fit.params, np.zeros((0, fit.params.dims)))
                continue
            cols = _scope_cols(self.n_items, name, sample)
            if self.bank is not None:  # a bank of some of the items: the estimates are about those
                cols = [c for c in cols if c in self.bank.index]
            if not calibrated:  # a calibration of its own, on the sample: base, experts, merges
                calibrated = self._evaluate(None if sample is None else _items_of(every), None, None)
            y = response_matrix([c.responses for c in calibrated], cols)
            if self.bank is not None:
                fit = self.bank.fit(name, cols, cal.model, seed)
                params = fit.params
                self.changed = True
            else:
                params = irt.fit_irt(y, model=cal.model, seed=seed)
            scopes[name] = Scope(name, cols, params, np.zeros((0, params.dims)))
        for sc in scopes.values():
            sc.endpoint_thetas = self._endpoint_thetas(sc)
            sc.save(self.folder)
        return scopes

    def _bank_fit(self, scope: str) -> Any:
        """The bank's fit for ``scope`` when its items are the scope's (all of them or a sample)."""
        if self.bank is None:
            return None
        fit = self.bank.fits.get(scope)
        if fit is None and scope == "mean" and len(self.n_items) == 1:  # one task: its fit is the mean's
            fit = self.bank.fits.get(next(iter(self.n_items)))
        if fit is None:
            return None
        every = set(columns(self.n_items, scope))
        return fit if all(self.bank.columns[j] in every for j in fit.cols) else None

    def _evaluate(
        self,
        items: dict[str, list[int]] | None,
        labels: Sequence[str] | None,
        merges: int | None,
        first: int = 0,
    ) -> list[Any]:
        done = calibrate(self.evals, self.space, self.config, items, labels, merges, first)
        ids = {c.id for c in done}
        self.evaluated = [c for c in self.evaluated if c.id not in ids] + done
        self._add(done)
        return done

    def _subject(self, c: Any) -> Any:
        from evomerge.bank import Subject, merge_id

        label = c.label or ""
        if label in self.inputs:  # the base or an expert: its own weights, whatever the recipe says
            return Subject(self.inputs[label], label, source=str(self.folder.parent))
        sid = merge_id(self.inputs, {"recipe": c.recipe_key})
        genome = tuple(c.genome) if c.genome is not None else None
        return Subject(sid, label, genome, self.space_id if genome else None, str(self.folder.parent))

    def _add(self, evaluated: Sequence[Any]) -> None:
        if self.bank is None or not self.inputs:
            return
        for c in evaluated:
            if c.responses:
                self.changed |= self.bank.add(self._subject(c), c.responses)

    def _endpoint_thetas(self, scope: Scope) -> np.ndarray:
        """The base's and the experts' abilities on the scope's items, from the bank or this run's
        calibration; the ones neither has are evaluated now (the mp estimators combine them)."""
        if not any(
            irt.get_estimator(o.estimator).needs_endpoints for o in self.config.objectives if o.estimator
        ):
            return np.zeros((0, scope.params.dims))
        labels = ["base", *self.experts]
        rows: dict[str, np.ndarray] = {}
        for c in self.evaluated:
            if c.label in labels:
                rows[c.label] = response_matrix([c.responses], scope.cols)[0]
        if self.bank is not None:
            for label in labels:
                if label not in rows and label in self.inputs:
                    found = self.bank.responses_of(self.inputs[label], scope.cols)
                    if found is not None:
                        rows[label] = found
        missing = [label for label in labels if label not in rows]
        if missing:
            for c in self._evaluate(_items_of(scope.cols), missing, 0):
                rows[c.label] = response_matrix([c.responses], scope.cols)[0]
        everything = np.arange(len(scope.cols))
        return np.stack([irt.fit_ability(scope.params, everything, rows[label]) for label in labels])

    def fit_surrogate(self, scope: Scope) -> None:
        """sgpirt's prior: a Gaussian process of accuracy over genomes of this search space, fitted on
        the calibration merges (this run's and the bank's), the base and the experts where the space can
        express them; saved with the run, so a resumed run fits the same one."""
        import json

        path = self.folder / f"{scope.name}.surrogate.json"
        if path.is_file():
            data = json.loads(path.read_text())
            scope.surrogate = irt.fit_surrogate(
                np.asarray(data["genomes"], dtype=float), np.asarray(data["accuracy"]), self.config.seed
            )
            return
        genomes, accuracy = self._surrogate_data(scope)
        need = irt.MIN_SURROGATE_MERGES
        if len(genomes) < need:  # too few merges of this space: evaluate more on the scope's items
            have = sum(1 for c in self.evaluated if (c.label or "").startswith("random-"))
            self._evaluate(_items_of(scope.cols), [], need - len(genomes), first=have)
            genomes, accuracy = self._surrogate_data(scope)
        self.folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"genomes": genomes, "accuracy": accuracy}))
        scope.surrogate = irt.fit_surrogate(
            np.asarray(genomes, dtype=float), np.asarray(accuracy), self.config.seed
        )

    def _surrogate_data(self, scope: Scope) -> tuple[list[list[float]], list[float]]:
        seen: dict[tuple[float, ...], float] = {}
        for c in self.evaluated:
            if c.genome is not None:
                seen[tuple(c.genome)] = float(response_matrix([c.responses], scope.cols).mean())
        if self.bank is not None:
            sid = self.space_id
            for s in self.bank.subjects:
                genome = s.genome if s.space == sid else None
                if genome is None and s.id in self.inputs.values():  # the base or an expert: a corner
                    label = next(lb for lb, fp in self.inputs.items() if fp == s.id)
                    g = input_genome(self.space, label)
                    genome = tuple(g) if g is not None else None
                if genome is None or genome in seen:
                    continue
                row = self.bank.responses_of(s.id, scope.cols)
                if row is not None:
                    seen[genome] = float(row.mean())
        return [list(g) for g in seen], list(seen.values())

    def held_out(self, scope: Scope) -> list[dict[str, dict[str, float]]]:
        """Models whose answers to every item of the scope are known: the adaptive test's check."""
        if self.bank is not None:
            y, _ = self.bank.matrix(scope.cols)
        else:
            y = (
                response_matrix([c.responses for c in self.evaluated], scope.cols)
                if self.evaluated
                else np.zeros((0, 0))
            )
        out = []
        for row in y:
            r: dict[str, dict[str, float]] = {}
            for (t, i), v in zip(scope.cols, row, strict=True):
                r.setdefault(t, {})[i] = float(v)
            out.append(r)
        return out

    def save_bank(self) -> None:
        """Write the bank back when this run added to it, and record in the run folder which bank it used."""
        import json

        if self.bank is None:
            return
        if self.changed:
            self.bank.save(self.bank.path or bank_path(self.config, self.n_items))
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "bank": str(self.bank.path) if self.bank.path else None,
            "subjects": len(self.bank.subjects),
            "fits": {k: f.n_subjects for k, f in self.bank.fits.items()},
        }
        (self.folder / "bank.json").write_text(json.dumps(record, indent=1))


def input_ids(models: dict[str, Any], cache_dir: Path | None = None) -> dict[str, str]:
    """Who the base and each expert are in an item bank (by role): their weights' fingerprints; an
    adapter's with its base's, since it is that base with the adapter applied."""
    from evomerge.adapters import is_adapter
    from evomerge.bank import model_fingerprint

    base = model_fingerprint(models["base"], cache_dir)
    out = {"base": base}
    for name, ref in models["experts"].items():
        fp = model_fingerprint(ref, cache_dir)
        out[name] = f"{base}+{fp}" if is_adapter(ref) else fp
    return out


def bank_path(config: Any, n_items: dict[str, int]) -> Path:
    """Where this run's bank lives: ``estimation.bank`` when it names a file, else the cached one."""
    from evomerge.bank import bank_dir, bank_key

    setting = config.estimation.bank
    if setting not in ("auto", "none"):
        return Path(setting)
    return bank_dir(config.zoo.cache_dir) / bank_key(config.fitness.search_split, n_items)


def open_bank(config: Any, n_items: dict[str, int], origin: str = "run") -> Any:
    """The run's item bank: the file ``estimation.bank`` names (refused unless it covers the run's items),
    the cached one for these items, a new, empty one where that file does not exist yet (a run's config
    check refuses a missing file; `evomerge calibrate --out` makes one), or None for ``none``."""
    from evomerge.bank import ItemBank, new_bank

    setting = config.estimation.bank
    if setting == "none":
        return None
    path = bank_path(config, n_items)
    split = config.fitness.search_split
    if setting != "auto" and path.is_file():
        bank = ItemBank.load(path)
        bank.check_covers(n_items, split, f"item bank {str(path)!r}")
        return bank
    if path.is_file():
        return ItemBank.load(path)
    bank = new_bank(split, n_items, origin)
    bank.path = path
    return bank


def add_to_bank(
    config: Any,
    n_items: dict[str, int],
    evaluated: Sequence[Any],
    inputs: dict[str, str],
    space: Any,
    run_dir: Path,
) -> tuple[int, Path | None]:
    """Add a run's whole-split evaluations on the search split to its bank (``estimation.bank``): how
    many subjects were added or completed, and the bank's path. A front member re-scored on the whole
    split keeps the genome of the search candidate it re-scores."""
    if config.estimation.bank == "none" or not inputs:
        return 0, None
    genomes = {c.recipe_key: c.genome for c in evaluated if c.genome is not None}
    stage = IrtStage(None, space, [], config, n_items, run_dir / "irt", inputs)  # evaluates nothing
    before = len(stage.bank.subjects)
    whole = [
        c if c.genome is not None or c.recipe_key not in genomes else replace(c, genome=genomes[c.recipe_key])
        for c in evaluated
        if c.split == config.fitness.search_split and c.subset is None
    ]
    stage._add(whole)
    if not stage.changed:
        return 0, stage.bank.path
    stage.bank.save(stage.bank.path)
    return max(len(stage.bank.subjects) - before, 1), stage.bank.path
