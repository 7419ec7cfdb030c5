"""A subject's ability from its answers (:func:`fit_ability`, MAP under the N(0, I) training population) and
which items to ask (:func:`select_items`, :func:`anchor_weights`)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from evomerge.errors import EvomergeError, unknown
from evomerge.irt.params import SELECTORS, IrtParams


def _check_subset(params: IrtParams, idx: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx, y = np.asarray(idx), np.asarray(y, dtype=float)
    if idx.ndim != 1 or y.shape != idx.shape or len(idx) == 0:
        raise EvomergeError(
            f"idx and y must be 1-D of the same non-zero length; got {idx.shape} and {y.shape}"
        )
    if not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= params.n_items:
        raise EvomergeError(f"idx must be integers in [0, {params.n_items - 1}] (item indices)")
    if len(np.unique(idx)) != len(idx):
        raise EvomergeError("idx must not repeat an item")
    if not np.isin(y, (0.0, 1.0)).all():
        raise EvomergeError("y must be 0/1 (NaN not allowed); allowed values are 0 and 1")
    return idx, y


def _neg_log_lik_z(z: np.ndarray, y: np.ndarray, g: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per answer: -log p(y | z) and its derivative in the logit z, p = g + (1 - g) sigmoid(z) (g None: 0)."""
    if g is None:
        return np.logaddexp(0.0, z) - y * z, expit(z) - y
    s = expit(z)
    log_s, log_1s = -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)
    with np.errstate(divide="ignore"):
        log_p = np.logaddexp(np.log(g), np.log1p(-g) + log_s)
    log_q = np.log1p(-g) + log_1s
    p = np.exp(log_p)
    # d(-log lik)/dz = (1 - y) s - y (1 - g) s (1 - s) / p
    return -(y * log_p + (1 - y) * log_q), (1 - y) * s - y * (1 - g) * s * (1 - s) / p


def _neg_log_posterior(
    theta: np.ndarray, a: np.ndarray, b: np.ndarray, y: np.ndarray, g: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """-log p(y | theta) - log N(theta; 0, I) (up to a constant) and its gradient in theta."""
    value, dz = _neg_log_lik_z(a @ theta - b, y, g)
    return float(value.sum() + 0.5 * theta @ theta), a.T @ dz + theta


def _guess(params: IrtParams, idx: np.ndarray) -> np.ndarray | None:
    return None if params.g is None else params.g[idx]


def fit_ability(params: IrtParams, idx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """MAP ability (dims,) from answers ``y`` on items ``idx``: argmax_theta sum_j log p(y_j | theta) +
    log N(theta; 0, I), p the model's (3PL: with guessing). The N(0, I) prior is the (standardised) training
    population; it keeps all-correct and all-wrong answers finite. Solved with L-BFGS from theta = 0."""
    idx, y = _check_subset(params, idx, y)
    res = minimize(
        _neg_log_posterior,
        np.zeros(params.dims),
        (params.a[idx], params.b[idx], y, _guess(params, idx)),
        jac=True,
        method="L-BFGS-B",
    )
    return res.x


def _population_theta(params: IrtParams) -> np.ndarray:
    """Training abilities, or (when unknown) 1000 seeded draws from the N(0, I) population."""
    if params.theta is not None:
        return params.theta
    return np.random.default_rng(0).normal(size=(1000, params.dims))


def select_items(params: IrtParams, n: int, method: str = "random", seed: int = 0) -> np.ndarray:
    """``n`` distinct item indices (sorted).

    random: uniform without replacement. anchor: tinyBenchmarks' anchor points, k-means (n clusters, seeded)
    over the item embeddings [a_i, b_i], keeping the item nearest each centroid; weigh them with
    :func:`anchor_weights`. information: the n items with the largest Fisher information
    (:meth:`IrtParams.information`: 2PL ||a_i||^2 p_i q_i, 3PL ||a_i||^2 (p_i - g_i)^2 q_i / ((1 - g_i)^2 p_i))
    averaged over the training abilities (N(0, I) when unknown). The embedding of a 3PL adds g_i.
    """
    if method not in SELECTORS:
        raise unknown("item selector", method, SELECTORS)
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= params.n_items:
        raise EvomergeError(f"n must be an integer in [1, {params.n_items}] (number of items); got {n!r}")
    if method == "random":
        return np.sort(np.random.default_rng(seed).choice(params.n_items, n, replace=False))
    if method == "information":
        info = params.information(_population_theta(params)).mean(axis=0)
        return np.sort(np.argsort(-info, kind="stable")[:n])
    from sklearn.cluster import KMeans

    x = _embedding(params)
    km = KMeans(n_clusters=n, n_init="auto", random_state=seed).fit(x)
    dist = ((km.cluster_centers_[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    chosen = dist.argmin(axis=1)
    if len(np.unique(chosen)) < n:
        raise EvomergeError(f"anchor selection found fewer than {n} distinct items; ask for fewer items")
    return np.sort(chosen)


def _embedding(params: IrtParams) -> np.ndarray:
    return np.column_stack([params.a, params.b] + ([] if params.g is None else [params.g]))


def anchor_weights(params: IrtParams, idx: np.ndarray) -> np.ndarray:
    """Weights (sum 1) for the items ``idx``: w_j = share of all items whose nearest item of ``idx`` in the
    embedding [a_i, b_i] (3PL: [a_i, b_i, g_i]) is j. For anchor items this is the share of their k-means cluster (up to items on a
    cluster border); pass them as ``weights`` to the estimators."""
    idx = np.asarray(idx)
    _check_subset(params, idx, np.zeros(len(idx)))
    x = _embedding(params)
    nearest = np.concatenate(  # in chunks: a bank of 40k items x 100 anchors stays small in memory
        [
            ((x[k : k + 4096, None, :] - x[idx][None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
            for k in range(0, len(x), 4096)
        ]
    )
    return np.bincount(nearest, minlength=len(idx)) / params.n_items


def _check_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise EvomergeError(f"weights must be {n} finite values >= 0 with a positive sum")
    return w / w.sum()
