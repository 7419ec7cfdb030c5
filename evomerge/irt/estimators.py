"""Accuracy estimators, registered in :data:`ESTIMATORS` with what they need besides a subject's answers
(:func:`estimator`): mean, IRT, p-IRT, gp-IRT, mp-IRT, gmp-IRT and sgp-IRT (with its :class:`Surrogate`).

An estimator outside evomerge registers through the ``evomerge.estimators`` entry point group: the
entry point names a module that, imported, decorates its functions with :func:`estimator`."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize

from evomerge.errors import EvomergeError, unknown
from evomerge.irt.ability import _check_subset, _check_weights, _guess, _neg_log_posterior, fit_ability
from evomerge.irt.params import ANCHOR_VARIANCE_FACTOR, MIN_SURROGATE_MERGES, IrtParams
from evomerge.registry import Registry

NEEDS = {
    "endpoints": ("endpoint_thetas", "endpoint_thetas (abilities of the merged models)"),
    "prior": ("prior", "prior=(mean, variance), e.g. Surrogate.predict(genome)"),
}


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: ``fn(params, idx, y, ...) -> accuracy`` and its declaration.

    ``needs``: inputs it cannot do without, from :data:`NEEDS`: ``"endpoints"`` (the abilities of the
    merged models; calibration fits them on the base and the experts) and ``"prior"`` (mean, variance)
    of the accuracy (calibration's :class:`Surrogate` predicts it from the genome). ``weighted``: ``fn``
    takes anchor ``weights`` for its subset mean (read from its signature). ``min_calibration_merges``:
    random merges calibration must evaluate for it. ``adaptive``: it can score an adaptive test
    (``items: adaptive``), whose estimate comes with a standard error.
    """

    name: str
    fn: Callable[..., float]
    needs: frozenset[str] = frozenset()
    weighted: bool = False
    min_calibration_merges: int = 0
    doc: str = field(default="", repr=False)
    adaptive: bool = False

    @property
    def needs_endpoints(self) -> bool:
        return "endpoints" in self.needs

    @property
    def needs_prior(self) -> bool:
        return "prior" in self.needs

    def __call__(
        self,
        params: IrtParams,
        idx: np.ndarray,
        y: np.ndarray,
        endpoint_thetas: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        prior: tuple[float, float] | None = None,
    ) -> float:
        """``fn`` given what it declared; inputs it does not take are ignored."""
        given = {"endpoints": endpoint_thetas, "prior": prior}
        inputs: dict[str, Any] = {}
        for need, (keyword, ask) in NEEDS.items():
            if need in self.needs:
                if given[need] is None:
                    raise EvomergeError(f"estimator {self.name!r} needs {ask}")
                inputs[keyword] = given[need]
        if self.weighted:
            inputs["weights"] = weights
        return self.fn(params, idx, y, **inputs)


ESTIMATORS: Registry[Estimator] = Registry("estimator", Estimator, group="evomerge.estimators")


def estimator(
    name: str, *, needs: Collection[str] = (), min_calibration_merges: int = 0, adaptive: bool = False
) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Register ``fn(params, idx, y, [endpoint_thetas], [prior], [weights]) -> float`` under ``name``.

    ``fn`` must take the keyword of each need (:data:`NEEDS`); a ``weights`` parameter makes it weighted."""
    bad = [n for n in needs if n not in NEEDS]
    if bad:
        raise unknown("estimator need", bad[0], NEEDS)

    def register(fn: Callable[..., float]) -> Callable[..., float]:
        signature = inspect.signature(fn).parameters
        missing = [NEEDS[n][0] for n in needs if NEEDS[n][0] not in signature]
        if missing:
            raise TypeError(
                f"estimator {name!r} needs {missing[0]!r} but {fn.__name__} takes no such argument"
            )
        spec = Estimator(
            name,
            fn,
            frozenset(needs),
            "weights" in signature,
            min_calibration_merges,
            fn.__doc__ or "",
            adaptive,
        )
        ESTIMATORS.add(name, spec)
        return fn

    return register


def get_estimator(name: str) -> Estimator:
    """The registered estimator ``name``; an unknown name is one line with "did you mean"."""
    return ESTIMATORS.get(name)


def __getattr__(name: str) -> Any:
    if name == "PRIOR_ESTIMATORS":  # the names of the estimators that need a prior (derived, for callers)
        return tuple(n for n in ESTIMATORS if ESTIMATORS.get(n).needs_prior)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@estimator("mean")
def estimate_mean(
    params: IrtParams, idx: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """mean: sum_j w_j y_j / sum_j w_j over the subset (w_j = 1 without weights)."""
    idx, y = _check_subset(params, idx, y)
    return float(_check_weights(weights, len(idx)) @ y)


@estimator("irt", adaptive=True)
def estimate_irt(params: IrtParams, idx: np.ndarray, y: np.ndarray) -> float:
    """irt: (1/N) sum_{i=1..N} p_i(theta_hat), theta_hat = fit_ability(params, idx, y), N = n_items."""
    return float(params.prob(fit_ability(params, idx, y)).mean())


def _pirt(params: IrtParams, idx: np.ndarray, y: np.ndarray, theta: np.ndarray) -> float:
    p = params.prob(theta)
    return float((y.sum() + p.sum() - p[idx].sum()) / params.n_items)


@estimator("pirt", adaptive=True)
def estimate_pirt(params: IrtParams, idx: np.ndarray, y: np.ndarray) -> float:
    """p-IRT (tinyBenchmarks): (sum_{j in S} y_j + sum_{i not in S} p_i(theta_hat)) / N, S = idx."""
    idx, y = _check_subset(params, idx, y)
    return _pirt(params, idx, y, fit_ability(params, idx, y))


def residual_correction(
    params: IrtParams, idx: np.ndarray, y: np.ndarray, theta: np.ndarray, drawn: np.ndarray
) -> tuple[float, float]:
    """(c, var c): the mean residual y_j - p_j(theta) over the randomly drawn items, scaled to the share of
    unanswered items, and its sampling variance (residual variance / draws; the model's p q while there
    are fewer than 2 draws). For random draws c estimates the model's error on the unanswered items."""
    n = params.n_items
    share = (n - len(idx)) / n
    if len(drawn) == 0:
        return 0.0, math.inf
    p = params.prob(theta)[idx[drawn]]
    e = y[drawn] - p
    var = float(np.var(e, ddof=1)) if len(e) >= 2 else float(np.mean(p * (1 - p)))
    return float(e.mean()) * share, share**2 * max(var, 1e-6) / len(e)


@estimator("rcirt")
def estimate_rcirt(params: IrtParams, idx: np.ndarray, y: np.ndarray) -> float:
    """rc-IRT: p-IRT plus the subset's mean residual, shrunk: est = pirt + lam c, c = mean_{j in S} (y_j -
    p_j(theta_hat)) scaled to the unanswered share (:func:`residual_correction`), lam = B^2 / (B^2 + var c)
    with B^2 = (pi / 2) irt_bias^2 (the calibration's validation error as a mean squared bias; lam = 1
    without it). For a random subset c estimates the model's own error, so this is a model-assisted
    difference estimator: the IRT model's prediction, corrected by what the items asked show of its error
    (the adaptive test's estimate, for a fixed subset). Meant for random selection."""
    idx, y = _check_subset(params, idx, y)
    theta = fit_ability(params, idx, y)
    c, var_c = residual_correction(params, idx, y, theta, np.arange(len(idx)))
    b2 = math.inf if params.irt_bias is None else math.pi / 2 * params.irt_bias**2
    lam = 1.0 if math.isinf(b2) else (b2 / (b2 + var_c) if b2 + var_c > 0 else 0.0)
    return float(min(1.0, max(0.0, _pirt(params, idx, y, theta) + lam * c)))


def gp_lambda(params: IrtParams, n: int, weighted: bool = False) -> float:
    """gp-IRT's data-chosen weight of the subset mean (tinyBenchmarks' ``get_lambda``):

    lambda = b_hat^2 / (b_hat^2 + v / n_eff), b_hat = ``irt_bias`` (validation error of the IRT prediction),
    v = ``response_variance`` (mean over calibration subjects of their response variance over items, so
    v / n is the variance of the mean of n random items); n_eff = n for an unweighted subset and 4n for an
    anchor-weighted one (tinyBenchmarks' allowance for the variance clustering removes).
    """
    if params.response_variance is None or params.irt_bias is None:
        raise EvomergeError(
            "gp estimators need response_variance and irt_bias; fit with fit_irt or pass them"
        )
    bias2 = params.irt_bias**2
    total = bias2 + params.response_variance / (n * (ANCHOR_VARIANCE_FACTOR if weighted else 1.0))
    return float(bias2 / total) if total > 0 else 0.0


@estimator("gpirt")
def estimate_gpirt(
    params: IrtParams, idx: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """gp-IRT (tinyBenchmarks): lambda mean + (1 - lambda) pirt, lambda = gp_lambda(params, n, weighted)."""
    lam = gp_lambda(params, len(np.asarray(idx)), weights is not None)
    return lam * estimate_mean(params, idx, y, weights) + (1 - lam) * estimate_pirt(params, idx, y)


def fit_merge_ability(
    params: IrtParams, idx: np.ndarray, y: np.ndarray, endpoint_thetas: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """MERGE^3's merged ability theta = sum_j lambda_j theta_j over the endpoint abilities (k x dims), with
    lambda = argmax_{lambda >= 0} log p(y | theta) + log N(theta; 0, I) (the prior of :func:`fit_ability`,
    so all-correct answers stay finite), by L-BFGS-B from lambda_j = 1/k. Returns (theta, lambda)."""
    idx, y = _check_subset(params, idx, y)
    ends = np.asarray(endpoint_thetas, dtype=float)
    if ends.ndim == 1 and params.dims == 1:
        ends = ends[:, None]
    if ends.ndim != 2 or len(ends) == 0 or ends.shape[1] != params.dims or not np.isfinite(ends).all():
        raise EvomergeError(f"endpoint_thetas must be finite (n_endpoints, {params.dims}); got {ends.shape}")

    def objective(lam: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = _neg_log_posterior(lam @ ends, params.a[idx], params.b[idx], y, _guess(params, idx))
        return value, ends @ grad

    k = len(ends)
    res = minimize(objective, np.full(k, 1 / k), jac=True, method="L-BFGS-B", bounds=[(0, None)] * k)
    return res.x @ ends, res.x


@estimator("mpirt", needs={"endpoints"})
def estimate_mpirt(params: IrtParams, idx: np.ndarray, y: np.ndarray, endpoint_thetas: np.ndarray) -> float:
    """mp-IRT (MERGE^3): the p-IRT formula (sum_{j in S} y_j + sum_{i not in S} p_i(theta)) / N with
    theta = sum_j lambda_j theta_j from :func:`fit_merge_ability`."""
    idx, y = _check_subset(params, idx, y)
    theta, _ = fit_merge_ability(params, idx, y, endpoint_thetas)
    return _pirt(params, idx, y, theta)


@estimator("gmpirt", needs={"endpoints"})
def estimate_gmpirt(
    params: IrtParams,
    idx: np.ndarray,
    y: np.ndarray,
    endpoint_thetas: np.ndarray,
    weights: np.ndarray | None = None,
) -> float:
    """gmp-IRT: lambda mean + (1 - lambda) mpirt, lambda = gp_lambda(params, n, weighted) as in gp-IRT."""
    lam = gp_lambda(params, len(np.asarray(idx)), weights is not None)
    mp = estimate_mpirt(params, idx, y, endpoint_thetas)
    return lam * estimate_mean(params, idx, y, weights) + (1 - lam) * mp


def gp_variance(params: IrtParams, n: int, weighted: bool = False) -> float:
    """The expected squared error of the gp-IRT estimate from ``n`` items, under gp-IRT's own model
    (an IRT prediction with error variance b_hat^2 averaged, with the optimal :func:`gp_lambda`, with a
    subset mean of variance v / n_eff): 1 / (1 / b_hat^2 + n_eff / v)."""
    gp_lambda(params, n, weighted)  # the same checks
    assert params.irt_bias is not None and params.response_variance is not None
    n_eff = n * (ANCHOR_VARIANCE_FACTOR if weighted else 1.0)
    if params.irt_bias == 0 or params.response_variance == 0:
        return 0.0
    return float(1.0 / (1.0 / params.irt_bias**2 + n_eff / params.response_variance))


class Surrogate:
    """A Gaussian process of accuracy over genomes (scikit-learn's GaussianProcessRegressor: constant x
    anisotropic RBF + white noise, hyperparameters by marginal likelihood, targets standardised), fitted
    on calibration merges: ``predict(genome)`` gives the accuracy's predictive mean and variance."""

    def __init__(self, genomes: np.ndarray, accuracy: np.ndarray, seed: int = 0) -> None:
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        x, acc = np.asarray(genomes, dtype=float), np.asarray(accuracy, dtype=float)
        if x.ndim != 2 or acc.shape != (len(x),) or len(x) < MIN_SURROGATE_MERGES:
            raise EvomergeError(
                f"a surrogate needs genomes (m x d) and m accuracies with m >= {MIN_SURROGATE_MERGES}; "
                f"got {x.shape} and {acc.shape}"
            )
        if not (np.isfinite(x).all() and np.isfinite(acc).all()):
            raise EvomergeError("surrogate genomes and accuracies must be finite (no NaN)")
        kernel = ConstantKernel(1.0) * RBF(np.ones(x.shape[1]), (1e-2, 1e3)) + WhiteKernel(1e-3, (1e-8, 1.0))
        self.gp = GaussianProcessRegressor(
            kernel, normalize_y=True, n_restarts_optimizer=3, random_state=seed
        )
        with warnings.catch_warnings():  # length scales at their bounds: irrelevant genes, not an error
            warnings.simplefilter("ignore")
            self.gp.fit(x, acc)
        self.n_genes = x.shape[1]

    def predict(self, genome: Sequence[float] | np.ndarray) -> tuple[float, float]:
        """(mean, variance) of the accuracy at ``genome``."""
        g = np.asarray(genome, dtype=float).reshape(1, -1)
        if g.shape[1] != self.n_genes:
            raise EvomergeError(f"genome has {g.shape[1]} genes, the surrogate was fitted on {self.n_genes}")
        mean, sd = self.gp.predict(g, return_std=True)
        return float(mean[0]), float(sd[0]) ** 2


def fit_surrogate(genomes: np.ndarray, accuracy: np.ndarray, seed: int = 0) -> Surrogate:
    """A :class:`Surrogate` of accuracy over genomes from calibration merges (m >= 8 of them)."""
    return Surrogate(genomes, accuracy, seed)


@estimator("sgpirt", needs={"prior"}, min_calibration_merges=MIN_SURROGATE_MERGES, adaptive=True)
def estimate_sgpirt(
    params: IrtParams,
    idx: np.ndarray,
    y: np.ndarray,
    prior: tuple[float, float],
    weights: np.ndarray | None = None,
) -> float:
    """sgp-IRT: the gp-IRT estimate e, of error variance v = :func:`gp_variance`, fused with a prior
    N(mu, s^2) on the accuracy (a :class:`Surrogate`'s prediction for the subject's genome) as two
    independent Gaussian measurements: (s^2 e + v mu) / (s^2 + v)."""
    mu, s2 = (float(v) for v in prior)
    if not (math.isfinite(mu) and math.isfinite(s2) and s2 >= 0):
        raise EvomergeError(f"prior must be (mean, variance >= 0), finite; got {prior}")
    e = estimate_gpirt(params, idx, y, weights)
    v = gp_variance(params, len(np.asarray(idx)), weights is not None)
    return float(mu if v + s2 == 0 else (s2 * e + v * mu) / (s2 + v))


def estimate_accuracy(
    params: IrtParams,
    idx: np.ndarray,
    y: np.ndarray,
    estimator: str = "gpirt",
    endpoint_thetas: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    prior: tuple[float, float] | None = None,
) -> float:
    """Estimated accuracy over all ``params.n_items`` items of a subject whose 0/1 answers on items ``idx``
    are ``y``, by ``estimator`` (a name in ESTIMATORS, see estimate_<name>). ``weights``: per-item weights of
    the subset (e.g. :func:`anchor_weights`) for the mean part of the weighted estimators (mean, gpirt,
    gmpirt, sgpirt); ``endpoint_thetas`` (endpoints x dims) for those that need ``"endpoints"`` (mpirt,
    gmpirt); ``prior`` (mean, variance) of the accuracy for those that need ``"prior"`` (sgpirt). Inputs an
    estimator does not take are ignored."""
    return get_estimator(estimator)(params, idx, y, endpoint_thetas, weights, prior)
