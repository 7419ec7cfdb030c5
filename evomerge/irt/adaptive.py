"""Adaptive testing: ask a subject the most informative items a batch at a time until its accuracy estimate
is precise enough (:func:`adaptive_test`), and how well that does on held-out subjects (:func:`check_adaptive`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.irt.ability import fit_ability, select_items
from evomerge.irt.estimators import estimate_pirt, residual_correction
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
    """The posterior covariance of the MAP ability (Laplace): (sum_j w_j a_j a_j^T + I)^-1 over the
    answered items, w_j the item's information weight (:meth:`IrtParams.weight`: 2PL p_j q_j), I from the
    N(0, I) prior."""
    idx = np.asarray(idx)
    a = params.a[idx]
    w = params.weight(theta)[idx]
    info = (a * w[:, None]).T @ a + np.eye(params.dims)
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
    grad = (params.a[rest] * params.slope(theta)[rest][:, None]).sum(axis=0) / n
    var = (
        float(grad @ ability_covariance(params, idx, theta) @ grad)
        + float((p[rest] * (1 - p[rest])).sum()) / n**2
    )
    return estimate, math.sqrt(max(var, 0.0))


def most_informative(params: IrtParams, theta: np.ndarray, asked: Collection[int], k: int) -> list[int]:
    """The ``k`` unasked items of largest Fisher information at ``theta`` (:meth:`IrtParams.information`:
    2PL ||a_i||^2 p_i q_i, 3PL ||a_i||^2 (p_i - g_i)^2 q_i / ((1 - g_i)^2 p_i); ties: lower index)."""
    info = params.information(theta).astype(float)
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
    explore: float = 1.0,
    seed: int = 0,
) -> AdaptiveResult:
    """Ask ``answer(items)`` for 0/1 answers ``batch`` items at a time until the accuracy estimate's standard
    error is at most ``target_se`` ("precise"), ``max_items`` are answered ("max_items"), every item is
    ("exhausted"), or ``race(estimate, se)`` says the subject cannot matter any more ("raced").

    Each batch mixes ``round(explore * batch)`` items drawn uniformly at random (seeded by ``seed``) with
    the most informative items at the current MAP ability (Fluid Benchmarking's rule) for the rest. The
    estimate is p-IRT's M (answered items as answered, the others at p_i(theta)) plus a shrunk correction
    from the random draws: est = M + lam c, c = the draws' mean residual y - p(theta) (an unbiased estimate
    of M's error where the model is wrong), lam = B^2 / (B^2 + var c), B^2 = (pi / 2) irt_bias^2 (the
    calibration's validation error as a mean squared bias). Its variance is the model's (ability
    uncertainty by the delta method, Bernoulli spread) plus (1 - lam)^2 B^2 + lam^2 var c, so that a
    misspecified model's bias is in the standard error. Parameters without ``irt_bias`` (true, simulated
    ones) take lam = 0 and no bias term. ``explore`` = 0 is the pure information rule, which is best when
    the model is right (simulated data); on real LLM answers (experiments/benchmarks/irt_real.py) items
    informative at theta were worse than random ones (their large fitted a are overfitted), so the default
    1 asks random items only and the test adapts by when it stops.
    ``se_scale`` multiplies the standard error (a held-out check's measured error over the
    error the model claims). ``posterior(estimate, se)`` gives the estimate as the caller will use it
    (sgpirt: fused with the surrogate's prediction for this subject); the precision and race rules then
    judge that one, so a subject whose prior is already sharp stops early. The result keeps the items'
    own estimate."""
    if not target_se > 0:
        raise EvomergeError(f"target_se must be positive; got {target_se}")
    if not 1 <= max_items <= params.n_items:
        raise EvomergeError(
            f"max_items must be in [1, {params.n_items}] (the items there are); got {max_items}"
        )
    if not 0 <= explore <= 1:
        raise EvomergeError(f"explore must be in [0, 1] (the random share of a batch); got {explore}")
    rng = np.random.default_rng(seed)
    bias2 = None if params.irt_bias is None else math.pi / 2 * params.irt_bias**2
    asked: list[int] = []
    answers: list[float] = []
    drawn: list[int] = []  # positions in ``asked`` of the randomly drawn items
    theta = np.zeros(params.dims)
    while True:
        k = min(batch, max_items - len(asked))
        n_random = min(k, int(round(explore * k)))
        free = np.ones(params.n_items, dtype=bool)
        free[asked] = False
        pick = [int(i) for i in rng.choice(np.flatnonzero(free), n_random, replace=False)]
        new = pick + most_informative(params, theta, asked + pick, k - n_random)
        got = [float(v) for v in answer(new)]
        if len(got) != len(new) or not set(got) <= {0.0, 1.0}:
            raise EvomergeError(f"answer() must give one 0/1 per item; got {got!r} for {len(new)} items")
        drawn += range(len(asked), len(asked) + n_random)
        asked += new
        answers += got
        idx, y = np.array(asked), np.array(answers)
        theta = fit_ability(params, idx, y)
        estimate, se = accuracy_estimate(params, idx, y, theta)
        if bias2 is not None and len(asked) < params.n_items:
            c, var_c = residual_correction(params, idx, y, theta, np.array(drawn, dtype=int))
            lam = 0.0 if not math.isfinite(var_c) else bias2 / (bias2 + var_c) if bias2 + var_c > 0 else 0.0
            estimate = min(1.0, max(0.0, estimate + lam * c))
            extra = (1 - lam) ** 2 * bias2 + (lam**2 * var_c if lam > 0 else 0.0)
            se = math.sqrt(se**2 + extra)
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
    explore: float = 1.0,
) -> AdaptiveCheck:
    """Run the adaptive test on held-out subjects (rows of 0/1 answers to every item, subjects the
    parameters were not fitted on) and measure its errors against each subject's true accuracy. Either
    one ``params`` and its ``held_out`` rows, or folds: (params fitted without them, held-out rows).
    ``explore``: as :func:`adaptive_test`'s."""
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
                explore=explore,
                seed=seed,
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
