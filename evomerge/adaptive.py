"""A candidate's objectives scored by adaptive tests, on the worker that holds the candidate.

The driver's calibration (:mod:`evomerge.calibration`) fits each scope's IRT parameters and hands a job
one :class:`AdaptiveSpec` per objective; the worker runs :func:`adaptive_evaluate` over them (the test
itself is :func:`evomerge.irt.adaptive_test`), asking its fitness for a batch of items at a time, and
sends back an :class:`AdaptiveScore` per objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from evomerge.irt import IrtParams, adaptive_test

Column = tuple[str, str]  # (task, item id)


@dataclass(frozen=True)
class AdaptiveScore:
    """One objective's adaptive test on one candidate: the estimate (mixed with the plain mean and fused
    with the prior as its spec says), its standard error, why the test stopped (one of
    :data:`evomerge.irt.STOPS`) and the items it asked."""

    estimate: float
    se: float
    stopped: str
    items: int


ADAPTIVE_BATCH = 4  # items per step of an adaptive test: one fitness call each


@dataclass(frozen=True)
class Race:
    """What a raced candidate must be able to beat: the objectives' directions, the best values so far
    (one objective) or the front's points (several), as of the previous generation, and the z of the
    configured confidence."""

    directions: tuple[str, ...]
    front: tuple[tuple[float, ...], ...]
    z: float

    def hopeless(self, optimistic: Sequence[float]) -> bool:
        """Whether a candidate whose every objective is at most ``optimistic`` (its estimates pushed z
        standard errors the good way) is still dominated by a point of the front."""
        sign = [1.0 if d == "max" else -1.0 for d in self.directions]
        mine = [s * v for s, v in zip(sign, optimistic, strict=True)]
        for point in self.front:
            theirs = [s * v for s, v in zip(sign, point, strict=True)]
            if all(t >= m for t, m in zip(theirs, mine, strict=True)) and any(
                t > m for t, m in zip(theirs, mine, strict=True)
            ):
                return True
        return False


@dataclass(frozen=True)
class AdaptiveSpec:
    """What a worker needs to score one objective by an adaptive test: the scope's items and IRT
    parameters, the limits, the held-out check's mix with the plain mean, and (sgpirt) the prior."""

    objective: str
    cols: tuple[Column, ...]
    params: IrtParams
    target_se: float
    max_items: int
    lam: float = 0.0
    prior: tuple[float, float] | None = None
    batch: int = ADAPTIVE_BATCH
    se_scale: float = 1.0
    explore: float = 1.0  # the random share of each batch (evomerge.irt.adaptive_test)

    def key(self) -> str:
        import hashlib

        parts = (
            self.objective,
            self.cols[:3],
            len(self.cols),
            self.target_se,
            self.max_items,
            self.lam,
            self.se_scale,
            self.explore,
        )
        digest = hashlib.sha1(repr(parts).encode() + self.params.a.tobytes() + self.params.b.tobytes())
        return digest.hexdigest()[:12]


def adaptive_evaluate(
    specs: Sequence[AdaptiveSpec],
    ask: Callable[[dict[str, list[int]]], dict[str, dict[str, float]]],
    race: Race | None = None,
) -> tuple[dict[str, AdaptiveScore], dict[str, dict[str, float]]]:
    """Score each objective by an adaptive test, asking ``ask({task: [item ids]})`` for 0/1 answers of
    the items not answered yet (objectives over the same items share answers). Returns per objective
    an :class:`AdaptiveScore` and every answer given. With ``race``, the last objective's test also
    stops once the candidate, at its optimistic bounds, stays dominated (or below the best)."""
    answered: dict[str, dict[str, float]] = {}
    out: dict[str, AdaptiveScore] = {}

    def answer_cols(cols: Sequence[Column]) -> list[float]:
        missing: dict[str, list[int]] = {}
        for t, i in cols:
            if i not in answered.get(t, {}):
                missing.setdefault(t, []).append(int(i))
        if missing:
            got = ask(missing)
            for t, ids in missing.items():
                for i in ids:
                    answered.setdefault(t, {})[str(i)] = float(got[t][str(i)])
        return [answered[t][i] for t, i in cols]

    for n, spec in enumerate(specs):
        result = adaptive_test(
            spec.params,
            lambda items, spec=spec: answer_cols([spec.cols[i] for i in items]),
            target_se=spec.target_se,
            max_items=spec.max_items,
            batch=spec.batch,
            se_scale=spec.se_scale,
            explore=spec.explore,
            race=_racer(race, specs, out, n) if race is not None and n == len(specs) - 1 else None,
            posterior=lambda estimate, se, spec=spec: _fused(spec, estimate, se),
        )
        mixed = spec.lam * result.mean + (1 - spec.lam) * result.estimate
        value, se = _fused(spec, mixed, result.se)
        out[spec.objective] = AdaptiveScore(value, se, result.stopped, len(result.idx))
    return out, answered


def _racer(
    race: Race, specs: Sequence[AdaptiveSpec], done: dict[str, AdaptiveScore], n: int
) -> Callable[[float, float], bool]:
    """The stop rule of the last objective's test: the objectives scored before it at their optimistic
    bounds, this one at its running (fused) estimate's."""

    def good_way(k: int) -> float:
        return race.z if race.directions[k] == "max" else -race.z

    before = [
        done[s.objective].estimate + good_way(k) * done[s.objective].se for k, s in enumerate(specs[:n])
    ]

    def stop(value: float, spread: float) -> bool:
        return race.hopeless([*before, value + good_way(n) * spread])

    return stop


def _fused(spec: AdaptiveSpec, estimate: float, se: float) -> tuple[float, float]:
    """The estimate fused with the spec's prior N(mu, s^2) (sgpirt) as two Gaussian measurements."""
    if spec.prior is None:
        return estimate, se
    mu, s2 = spec.prior
    v = se**2
    if v + s2 == 0:
        return mu, 0.0
    return (s2 * estimate + v * mu) / (s2 + v), float(np.sqrt(s2 * v / (s2 + v)))
