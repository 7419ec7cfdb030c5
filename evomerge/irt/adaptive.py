"""Adaptive testing: ask a subject the most informative items a batch at a time until its accuracy estimate
is precise enough (:func:`adaptive_test`), and how well that does on held-out subjects (:func:`check_adaptive`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from evomerge.errors import EvomergeError
from evomerge.irt.ability import fit_ability, select_items
from evomerge.irt.estimators import estimate_pirt
from evomerge.irt.params import IrtParams, _check_responses

STOPS = ("precise", "max_items", "raced", "exhausted")


@dataclass(frozen=True)
class AdaptiveResult:
    """An adaptive test of one subject: the items asked in order, the answers, the estimated accuracy over
    every item (answered items count as answered, the others at p_i(theta)), its standard error, the
    ability, and why the test stopped (one of STOPS)."""

    idx: np.ndarray
    y: np.ndarray
    estimate: float
    se: float
    theta: np.ndarray
    stopped: str

    @property
    def mean(self) -> float:
        """The plain mean of the answered items."""
        return float(self.y.mean())


def ability_covariance(params: IrtParams, idx: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """The posterior covariance of the MAP ability (Laplace): (sum_j p_j q_j a_j a_j^T + I)^-1 over the
    answered items, I from the N(0, I) prior."""
    a = params.a[np.asarray(idx)]
    p = expit(a @ theta - params.b[np.asarray(idx)])
    info = (a * (p * (1 - p))[:, None]).T @ a + np.eye(params.dims)
    return np.linalg.inv(info)


def accuracy_estimate(
    params: IrtParams, idx: np.ndarray, y: np.ndarray, theta: np.ndarray
) -> tuple[float, float]:
    """(accuracy over every item, its standard error) for answers ``y`` on items ``idx`` at ability
    ``theta``: answered items count as answered, the others at p_i(theta). The variance adds the
    ability's uncertainty through the unanswered items (delta method) and their own Bernoulli spread."""
    n = params.n_items
    rest = np.ones(n, dtype=bool)
    rest[np.asarray(idx)] = False
    p = params.prob(theta)
    estimate = (float(np.sum(y)) + float(p[rest].sum())) / n
    grad = (params.a[rest] * (p[rest] * (1 - p[rest]))[:, None]).sum(axis=0) / n
    var = (
        float(grad @ ability_covariance(params, idx, theta) @ grad)
        + float((p[rest] * (1 - p[rest])).sum()) / n**2
    )
    return estimate, math.sqrt(max(var, 0.0))


def most_informative(params: IrtParams, theta: np.ndarray, asked: Collection[int], k: int) -> list[int]:
    """The ``k`` unasked items of largest Fisher information ||a_i||^2 p_i q_i at ``theta`` (ties: lower index)."""
    p = params.prob(theta)
    info = (params.a**2).sum(axis=1) * p * (1 - p)
    info[np.asarray(list(asked), dtype=int)] = -np.inf
    order = np.argsort(-info, kind="stable")
    return [int(i) for i in order[:k] if np.isfinite(info[i])]


def adaptive_test(
    params: IrtParams,
    answer: Callable[[list[int]], Sequence[float]],
    *,
    target_se: float,
    max_items: int,
    batch: int = 4,
    race: Callable[[float, float], bool] | None = None,
    se_scale: float = 1.0,
    posterior: Callable[[float, float], tuple[float, float]] | None = None,
) -> AdaptiveResult:
    """Ask ``answer(items)`` for 0/1 answers ``batch`` items at a time, each batch the most informative
    items at the current MAP ability (Fluid Benchmarking's rule), until the accuracy estimate's standard
    error is at most ``target_se`` ("precise"), ``max_items`` are answered ("max_items"), every item is
    ("exhausted"), or ``race(estimate, se)`` says the subject cannot matter any more ("raced").
    ``se_scale`` multiplies the model's standard error (a held-out check's measured error over the
    error the model claims: the model does not know how uncertain its own item parameters are).
    ``posterior(estimate, se)`` gives the estimate as the caller will use it (sgpirt: fused with the
    surrogate's prediction for this subject); the precision and race rules then judge that one, so a
    subject whose prior is already sharp stops early. The result keeps the items' own estimate."""
    if not target_se > 0:
        raise EvomergeError(f"target_se must be positive; got {target_se}")
    if not 1 <= max_items <= params.n_items:
        raise EvomergeError(
            f"max_items must be in [1, {params.n_items}] (the items there are); got {max_items}"
        )
    asked: list[int] = []
    answers: list[float] = []
    theta = np.zeros(params.dims)
    while True:
        new = most_informative(params, theta, asked, min(batch, max_items - len(asked)))
        got = [float(v) for v in answer(new)]
        if len(got) != len(new) or not set(got) <= {0.0, 1.0}:
            raise EvomergeError(f"answer() must give one 0/1 per item; got {got!r} for {len(new)} items")
        asked += new
        answers += got
        idx, y = np.array(asked), np.array(answers)
        theta = fit_ability(params, idx, y)
        estimate, se = accuracy_estimate(params, idx, y, theta)
        se *= se_scale
        judged = posterior(estimate, se) if posterior is not None else (estimate, se)
        stopped = (
            "exhausted"
            if len(asked) == params.n_items
            else "precise"
            if judged[1] <= target_se
            else "raced"
            if race is not None and race(*judged)
            else "max_items"
            if len(asked) >= max_items
            else None
        )
        if stopped:
            return AdaptiveResult(idx, y, estimate, se, theta, stopped)


@dataclass(frozen=True)
class AdaptiveCheck:
    """How adaptive tests did on held-out subjects whose every answer is known: mean absolute error of
    the IRT estimate, of the plain mean of the same items, and of ``mix`` = lam * mean + (1 - lam) * IRT
    with the ``lam`` in [0, 1] that fits best; for comparison, p-IRT on as many random items and on as
    many anchor items; items asked on average."""

    mae_irt: float
    mae_mean: float
    mae_mix: float
    lam: float
    items: float
    subjects: int
    mae_random: float = float("nan")
    mae_anchor: float = float("nan")
    se_scale: float = 1.0  # root mean squared error over root mean squared claimed standard error (>= 1)


def check_adaptive(
    params: IrtParams | Sequence[tuple[IrtParams, np.ndarray]],
    held_out: np.ndarray | None = None,
    *,
    target_se: float,
    max_items: int,
    batch: int = 4,
    seed: int = 0,
) -> AdaptiveCheck:
    """Run the adaptive test on held-out subjects (rows of 0/1 answers to every item, subjects the
    parameters were not fitted on) and measure its errors against each subject's true accuracy. Either
    one ``params`` and its ``held_out`` rows, or folds: (params fitted without them, held-out rows)."""
    folds = [(params, held_out)] if isinstance(params, IrtParams) else list(params)
    truth, irt_est, mean_est, counts, random_err, anchor_err, ses = [], [], [], [], [], [], []
    rng = np.random.default_rng(seed)
    for fold_params, rows in folds:
        rows = _check_responses(rows)
        if rows.shape[1] != fold_params.n_items:
            raise EvomergeError(
                f"held-out answers cover {rows.shape[1]} items, the parameters {fold_params.n_items}"
            )
        for row in rows:
            r = adaptive_test(
                fold_params,
                lambda items, row=row: row[items],
                target_se=target_se,
                max_items=max_items,
                batch=batch,
            )
            truth.append(row.mean())
            irt_est.append(r.estimate)
            mean_est.append(r.mean)
            ses.append(r.se)
            counts.append(len(r.idx))
            n = len(r.idx)
            idx = np.sort(rng.choice(fold_params.n_items, n, replace=False))
            random_err.append(abs(estimate_pirt(fold_params, idx, row[idx]) - row.mean()))
            try:
                anchors = select_items(fold_params, n, "anchor", seed=seed)
                anchor_err.append(abs(estimate_pirt(fold_params, anchors, row[anchors]) - row.mean()))
            except EvomergeError:  # fewer distinct anchors than items asked
                pass
    truth_a, irt_a, mean_a = np.array(truth), np.array(irt_est), np.array(mean_est)
    grid = np.linspace(0.0, 1.0, 21)
    mix_err = [float(np.abs(lam * mean_a + (1 - lam) * irt_a - truth_a).mean()) for lam in grid]
    best = int(np.argmin(mix_err))
    return AdaptiveCheck(
        float(np.abs(irt_a - truth_a).mean()),
        float(np.abs(mean_a - truth_a).mean()),
        mix_err[best],
        float(grid[best]),
        float(np.mean(counts)),
        len(truth),
        float(np.mean(random_err)),
        float(np.mean(anchor_err)) if anchor_err else float("nan"),
        max(1.0, float(np.sqrt(np.mean((irt_a - truth_a) ** 2) / max(np.mean(np.square(ses)), 1e-12)))),
    )
