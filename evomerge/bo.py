"""Proposals from optuna's samplers behind the ask/tell the search loop speaks (pymoo's).

``bo`` is optuna's GPSampler: a Gaussian process over the genome with log expected improvement for one
objective and log expected hypervolume improvement for several; it proposes a generation's batch with
the batch's earlier proposals pending (q-batch acquisition), so every worker gets a candidate.
``tpe`` is optuna's TPESampler (with the constant liar for pending trials) and ``optuna_cmaes`` its
CmaEsSampler, for users of optuna's (and OptunaHub's) merge samplers.

The state is the list of finished trials: each generation builds a fresh in-memory study from them and
a sampler seeded by (run seed, trials so far), so a checkpointed (pickled) search resumes exactly, and
trials known before the search (the calibration's random merges and the base and experts on the whole
split) warm-start it. A failed candidate is a failed trial, which the samplers leave out.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from evomerge.algorithms import FAILED_F, load_target, spec_for


def _gene(i: int) -> str:
    return f"x{i:04d}"


class OptunaSearch:
    """A pymoo-style algorithm (``setup``, ``has_next``, ``ask``, ``tell``) whose proposals come from an
    optuna sampler. ``pop_size`` genomes per generation; ``sampling`` (pop_size x n_var), when given,
    are the first genomes proposed (as many batches as they fill); ``options`` go to the sampler's
    constructor."""

    sampler: str = "bo"

    def __init__(self, pop_size: int = 8, sampling: Any = None, **options: Any) -> None:
        self.pop_size = pop_size
        self.first = None if sampling is None else np.asarray(sampling, dtype=float)
        self.options = options
        self.trials: list[Any] = []  # finished optuna FrozenTrials, in the order they were told
        self.warm: list[tuple[np.ndarray, np.ndarray]] = []
        self.generation = 0
        self._asked: list[Any] = []
        self._study: Any = None

    # --- pymoo's protocol -------------------------------------------------------------------------------
    def setup(self, problem: Any, termination: tuple[str, int], seed: int, verbose: bool = False) -> None:
        self.n_var, self.n_obj = int(problem.n_var), int(problem.n_obj)
        self.generations = int(termination[1])
        self.seed = int(seed)

    def warm_start(self, X: np.ndarray, F: np.ndarray) -> None:
        """Genomes evaluated before the search (minimised objective values, pymoo's F), known to the
        sampler from the first generation on; rows with a non-finite value are left out."""
        for x, f in zip(np.asarray(X, dtype=float), np.asarray(F, dtype=float), strict=True):
            if np.all(np.isfinite(f)):
                self.warm.append((x, f))

    def has_next(self) -> bool:
        return self.generation < self.generations

    def ask(self) -> Any:
        from pymoo.core.population import Population

        study = self._new_study()
        names = [_gene(i) for i in range(self.n_var)]
        given = self.first[self.told : self.told + self.pop_size] if self.first is not None else []
        for x in given:  # the given first genomes (initial: experts), a batch at a time
            study.enqueue_trial(dict(zip(names, map(float, x), strict=True)), skip_if_exists=False)
        distributions = self._distributions()
        self._asked = [study.ask(distributions) for _ in range(self.pop_size)]
        X = np.array([[t.params[n] for n in names] for t in self._asked])
        self._study = study
        return Population.new(X=X)

    def tell(self, infills: Any = None, **kwargs: Any) -> None:
        from optuna.trial import TrialState

        F = np.asarray(infills.get("F"), dtype=float)
        for trial, f in zip(self._asked, F, strict=True):
            if np.all(f >= FAILED_F) or not np.all(np.isfinite(f)):
                self._study.tell(trial, state=TrialState.FAIL)
            else:
                self._study.tell(trial, f.tolist() if self.n_obj > 1 else float(f[0]))
        asked = {t.number for t in self._asked}
        self.trials += [t for t in self._study.get_trials(deepcopy=False) if t.number in asked]
        self.generation += 1
        self._asked, self._study = [], None

    @property
    def told(self) -> int:
        """Genomes proposed and told so far (warm-start trials not included)."""
        return len(self.trials)

    # --- the study ---------------------------------------------------------------------------------------
    def _distributions(self) -> dict[str, Any]:
        from optuna.distributions import FloatDistribution

        return {_gene(i): FloatDistribution(0.0, 1.0) for i in range(self.n_var)}

    def _new_study(self) -> Any:
        """A study holding the warm-start and finished trials, with a sampler seeded by the run's seed
        and the number of trials so far: the same trials give the same proposals."""
        import optuna
        from optuna.trial import create_trial

        optuna.logging.set_verbosity(
            logging.ERROR
        )  # its notes on optional speed-ups are not the user's business
        seed = (self.seed * 1_000_003 + len(self.trials)) % 2**32
        sampler = load_target(spec_for(self.sampler).options_from)(seed=seed, **self._sampler_options())
        study = optuna.create_study(directions=["minimize"] * self.n_obj, sampler=sampler)
        distributions = self._distributions()
        names = list(distributions)
        known = [
            create_trial(
                params=dict(zip(names, map(float, x), strict=True)),
                distributions=distributions,
                values=f.tolist(),
                system_attrs={"evomerge:warm": True},
            )
            for x, f in self.warm
        ]
        study.add_trials(known + self.trials)
        return study

    def _sampler_options(self) -> dict[str, Any]:
        options = dict(self.options)
        if self.sampler == "bo":
            # the first generations are the sampler's random start unless warm-start trials replace them
            options.setdefault("n_startup_trials", max(1, min(10, self.pop_size) - len(self.warm)))
        return options

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_study"], state["_asked"] = None, []  # between generations nothing is pending
        return state


class BO(OptunaSearch):
    """optuna's GPSampler: Gaussian-process Bayesian optimisation (logEI, logEHVI)."""

    sampler = "bo"


class TPE(OptunaSearch):
    """optuna's TPESampler."""

    sampler = "tpe"


class OptunaCmaEs(OptunaSearch):
    """optuna's CmaEsSampler (one objective)."""

    sampler = "optuna_cmaes"
