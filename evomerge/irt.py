"""Item response theory (IRT): estimate a model's full-benchmark accuracy from its 0/1 answers on a few items.

One parameterisation everywhere in this module (tinyBenchmarks' ``item_curve``)::

    p_i(theta) = sigmoid(a_i . theta - b_i)

``a_i`` (``dims`` values, > 0) is item i's discrimination, ``b_i`` its difficulty and ``theta`` a subject's
ability (``dims`` values). py-irt's parameterisations are converted when parameters are fitted or loaded:
``"2pl"`` has logit ``alpha_i (theta - beta_i)``, so ``a_i = alpha_i`` and ``b_i = alpha_i beta_i``;
``"multidim_2pl"`` has logit ``sum_d gamma_id (theta_d - beta_id)``, so ``a_i = gamma_i`` and
``b_i = sum_d gamma_id beta_id``. When training abilities are known the latent scale is standardised
(``theta -> (theta - mu) / sd``, ``a -> a sd``, ``b -> b - a . mu``, which leaves every p_i unchanged), so the
training abilities have mean 0 and sd 1 in each dimension and N(0, I) is the training population's
ability distribution: :func:`fit_ability` uses it as prior.

Typical use: ``params = fit_irt(responses)`` on a calibration matrix (subjects x items), ``idx =
select_items(params, 20, "anchor")``, evaluate a new model on those items only, then
``estimate_accuracy(params, idx, y, "gpirt", weights=anchor_weights(params, idx))``.

For a merge population, where every subject is a point in a genome space, :func:`fit_surrogate` fits a
Gaussian process of accuracy over genomes on calibration merges; ``estimator="sgpirt"`` fuses its
prediction for a candidate's genome with the gp-IRT estimate from the candidate's items.

Estimators are registered in ``ESTIMATORS`` with what they need besides a subject's answers
(:func:`estimator`): the config validates names against it and calibration asks it what to pass, so a new
estimator is one decorated function here.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from evomerge.errors import EvomergeError, unknown
from evomerge.registry import Registry

MODELS = ("2pl", "multidim_2pl")
SELECTORS = ("random", "anchor", "information")
DEFAULT_MULTIDIM_DIMS = 2
ANCHOR_VARIANCE_FACTOR = 4.0
MIN_SURROGATE_MERGES = 8  # calibration merges a Surrogate needs at least
FORMAT = "evomerge.irt"


@dataclass(frozen=True, eq=False)
class IrtParams:
    """Fitted (or loaded) IRT parameters.

    ``a``: (n_items, dims) discriminations; ``b``: (n_items,) difficulties; ``theta``: (n_subjects, dims)
    training abilities or None; ``response_variance`` (v) and ``irt_bias`` (b-hat): the calibration
    statistics gp-IRT's lambda needs (:func:`gp_lambda`), None when unknown.
    """

    model: str
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray | None = None
    response_variance: float | None = None
    irt_bias: float | None = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise unknown("IRT model", self.model, MODELS)
        a = np.asarray(self.a, dtype=float)
        a = a[:, None] if a.ndim == 1 else a
        b = np.asarray(self.b, dtype=float)
        if a.ndim != 2 or b.shape != (a.shape[0],) or a.shape[0] < 1:
            raise EvomergeError(
                f"IRT a must be (n_items, dims) and b (n_items,); got {a.shape} and {b.shape}"
            )
        if self.model == "2pl" and a.shape[1] != 1:
            raise EvomergeError(
                f"IRT model '2pl' has 1 dimension; got a with {a.shape[1]} (use 'multidim_2pl')"
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise EvomergeError("IRT a and b must be finite (no NaN or inf)")
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        if self.theta is not None:
            theta = np.asarray(self.theta, dtype=float).reshape(len(self.theta), -1)
            if theta.shape[1] != a.shape[1] or not np.isfinite(theta).all():
                raise EvomergeError(f"IRT theta must be finite (n_subjects, {a.shape[1]}); got {theta.shape}")
            object.__setattr__(self, "theta", theta)

    @property
    def n_items(self) -> int:
        return self.a.shape[0]

    @property
    def dims(self) -> int:
        return self.a.shape[1]

    def prob(self, theta: np.ndarray) -> np.ndarray:
        """p_i(theta) = sigmoid(a_i . theta - b_i) for every item: (n_items,) for one theta, (k, n_items) for k."""
        return expit(np.asarray(theta, dtype=float) @ self.a.T - self.b)

    @classmethod
    def from_arrays(
        cls,
        a: np.ndarray,
        b: np.ndarray,
        model: str | None = None,
        theta: np.ndarray | None = None,
        response_variance: float | None = None,
        irt_bias: float | None = None,
    ) -> IrtParams:
        """Parameters fitted elsewhere: ``a`` (n_items,) or (n_items, dims), ``b`` (n_items,), in this module's
        parameterisation. ``model`` defaults to "2pl" for one dimension, else "multidim_2pl"."""
        a = np.asarray(a, dtype=float)
        if model is None:
            model = "2pl" if a.ndim == 1 or a.shape[1] == 1 else "multidim_2pl"
        return cls(model, a, np.asarray(b, dtype=float), theta, response_variance, irt_bias)

    def save(self, path: str | Path) -> None:
        """Write JSON: ``{"format": "evomerge.irt", "version": 1, "model", "a": [[..dims..] per item],
        "b": [..], "theta": [[..dims..] per subject] | null, "response_variance": v | null,
        "irt_bias": b-hat | null}``."""
        data = {
            "format": FORMAT,
            "version": 1,
            "model": self.model,
            "a": self.a.tolist(),
            "b": self.b.tolist(),
            "theta": None if self.theta is None else self.theta.tolist(),
            "response_variance": self.response_variance,
            "irt_bias": self.irt_bias,
        }
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> IrtParams:
        """Read JSON written by :meth:`save`, py-irt's output (``disc``, ``diff``, ``ability``: converted and
        standardised as the module docstring says) or tinyBenchmarks-style arrays ``A`` (dims x items, or
        1 x dims x items) and ``B`` (items, or dims x items summed over dims: logit sum_d A_d theta_d - B_d)."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise EvomergeError(f"{path}: IRT parameters must be a JSON object")
        if data.get("format") == FORMAT:
            fields = ("model", "a", "b", "theta", "response_variance", "irt_bias")
            return cls(*(data.get(k) for k in fields))
        if {"disc", "diff"} <= data.keys():
            multidim = np.asarray(data["disc"]).ndim == 2
            return _from_pyirt(data, "multidim_2pl" if multidim else "2pl")
        if {"A", "B"} <= data.keys():
            a = np.asarray(data["A"], dtype=float)
            a = a.reshape(-1, a.shape[-1]).T
            b = np.asarray(data["B"], dtype=float).reshape(-1, a.shape[0]).sum(axis=0)
            return cls.from_arrays(a, b)
        raise EvomergeError(
            f"{path}: unknown IRT parameter file; expected keys format='{FORMAT}', disc+diff (py-irt) or A+B"
        )


def _from_pyirt(export: dict, model: str) -> IrtParams:
    """py-irt's export (``disc``, ``diff``, ``ability``) in this module's parameterisation, scale standardised."""
    disc = np.asarray(export["disc"], dtype=float)
    diff = np.asarray(export["diff"], dtype=float)
    a = disc.reshape(len(disc), -1)
    b = (a * diff.reshape(a.shape)).sum(axis=1)
    theta = export.get("ability")
    if theta is None:
        return IrtParams(model, a, b)
    theta = np.asarray(theta, dtype=float).reshape(len(theta), a.shape[1])
    mu, sd = theta.mean(axis=0), theta.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return IrtParams(model, a * sd, b - a @ mu, (theta - mu) / sd)


def simulate_2pl(
    n_subjects: int, n_items: int, seed: int = 0, a_sd: float = 0.3, b_sd: float = 1.0
) -> tuple[np.ndarray, IrtParams]:
    """Responses from a known 2PL: theta ~ N(0, 1), a ~ LogNormal(0, a_sd), b ~ N(0, b_sd).

    Returns (responses (n_subjects x n_items) of 0/1, the true IrtParams with ``theta``). The defaults give
    MAE ~0.04 for the true-parameter irt estimator on the 20 most discriminating of 1000 items and ~0.08
    for the mean of 20 random items."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n_subjects, 1))
    params = IrtParams("2pl", np.exp(rng.normal(0.0, a_sd, n_items)), rng.normal(0.0, b_sd, n_items), theta)
    responses = (rng.random((n_subjects, n_items)) < params.prob(theta)).astype(np.int8)
    return responses, params


def _check_responses(responses: np.ndarray) -> np.ndarray:
    r = np.asarray(responses)
    if r.ndim != 2 or not (np.issubdtype(r.dtype, np.number) or r.dtype == bool):
        raise EvomergeError(f"responses must be a numeric subjects x items matrix; got shape {r.shape}")
    if r.shape[0] < 2 or r.shape[1] < 2:
        raise EvomergeError(
            f"responses need at least 2 subjects and 2 items; got {r.shape[0]} x {r.shape[1]}"
        )
    r = r.astype(float)
    if np.isnan(r).any():
        raise EvomergeError("responses contain NaN; allowed values are 0 and 1")
    if not np.isin(r, (0.0, 1.0)).all():
        raise EvomergeError("responses must be 0/1; allowed values are 0 and 1")
    return r


def _dims_candidates(model: str, dims: int | Sequence[int] | None) -> list[int]:
    if model not in MODELS:
        raise unknown("IRT model", model, MODELS)
    if dims is None:
        return [1 if model == "2pl" else DEFAULT_MULTIDIM_DIMS]
    cands = [dims] if isinstance(dims, (int, np.integer)) else list(dims)
    if not cands or any(not isinstance(d, (int, np.integer)) or d < 1 for d in cands):
        raise EvomergeError(f"dims must be an integer >= 1 or a list of them; got {dims!r}")
    if model == "2pl" and cands != [1]:
        raise EvomergeError(f"IRT model '2pl' has dims 1; got {dims!r} (use 'multidim_2pl')")
    return [int(d) for d in cands]


def _pyirt_fit(
    responses: np.ndarray, model: str, dims: int, seed: int, epochs: int, lr: float
) -> dict | None:
    """Variational fit of py-irt's model (hierarchical priors) with pyro SVI, as py-irt's trainer does, with
    Adam and an exponential lr decay to lr/10 at the last epoch. Runs in its own pyro param store and torch RNG
    state, with pyro's validation off so that a diverging fit shows as a NaN loss. Returns py-irt's export, or
    None when the loss or a parameter is not finite."""
    import pyro
    import torch
    from py_irt.models import Multidim2PL, TwoParamLog
    from pyro.infer import SVI, Trace_ELBO

    n_subjects, n_items = responses.shape
    subjects, items = (torch.as_tensor(x.ravel()) for x in np.indices(responses.shape))
    obs = torch.as_tensor(responses.ravel(), dtype=torch.float32)
    with (
        pyro.get_param_store().scope(),
        torch.random.fork_rng(devices=[]),
        pyro.validation_enabled(False),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
        torch.manual_seed(seed)
        if model == "2pl":
            irt = TwoParamLog(priors="hierarchical", num_items=n_items, num_subjects=n_subjects)
        else:
            irt = Multidim2PL(num_items=n_items, num_subjects=n_subjects, dims=dims)
        optim = pyro.optim.ExponentialLR(
            {"optimizer": torch.optim.Adam, "optim_args": {"lr": lr}, "gamma": 0.1 ** (1 / epochs)}
        )
        svi = SVI(irt.get_model(), irt.get_guide(), optim, loss=Trace_ELBO())
        for _ in range(epochs):
            if not math.isfinite(svi.step(subjects, items, obs)):
                return None
            optim.step()
        export = irt.export()
    finite = all(np.isfinite(np.asarray(export[k], dtype=float)).all() for k in ("disc", "diff", "ability"))
    return export if finite else None


def _fit_once(responses: np.ndarray, model: str, dims: int, seed: int, epochs: int, lr: float) -> IrtParams:
    """One py-irt fit; on divergence one retry with seed + 1 and lr / 2, then RuntimeError."""
    for attempt in range(2):
        export = _pyirt_fit(responses, model, dims, seed + attempt, epochs, lr / 2**attempt)
        if export is not None:
            return _from_pyirt(export, model)
    raise RuntimeError(f"py-irt fit diverged (NaN loss or parameters) at lr={lr} and lr={lr / 2}; lower lr")


def _validation_error(params: IrtParams, responses: np.ndarray) -> float:
    """tinyBenchmarks' validation error: for each held-out subject fit theta on the even items, then
    mean |mean_{odd i} p_i(theta) - mean_{odd i} y_i|."""
    seen, unseen = np.arange(0, params.n_items, 2), np.arange(1, params.n_items, 2)
    errors = [
        abs(params.prob(fit_ability(params, seen, r[seen]))[unseen].mean() - r[unseen].mean())
        for r in responses
    ]
    return float(np.mean(errors))


def fit_irt(
    responses: np.ndarray,
    model: str = "2pl",
    dims: int | Sequence[int] | None = None,
    seed: int = 0,
    epochs: int = 300,
    lr: float = 0.1,
    validation: float = 0.2,
) -> IrtParams:
    """Fit IRT parameters to a 0/1 subjects x items matrix with py-irt (see the module docstring for p_i).

    ``model``: "2pl" (1 dimension) or "multidim_2pl" (``dims`` dimensions, default 2; a list of candidates
    picks the one with the lowest validation error, as tinyBenchmarks does). ``validation``: the share of
    subjects held out (seeded) for a first fit whose validation error (:func:`_validation_error`) is the
    ``irt_bias`` gp-IRT uses; 0 measures it in-sample on the final fit (optimistic). The final fit uses all
    subjects; ``response_variance`` = mean over subjects of the variance of their responses over items.
    A fit whose loss or parameters turn NaN is retried once (seed + 1, lr / 2), then RuntimeError.
    """
    r = _check_responses(responses)
    cands = _dims_candidates(model, dims)
    if epochs < 1 or lr <= 0:
        raise EvomergeError(f"epochs must be >= 1 and lr > 0; got epochs={epochs}, lr={lr}")
    if not 0 <= validation < 1:
        raise EvomergeError(f"validation must be in [0, 1); got {validation}")
    n_val = int(round(validation * r.shape[0]))
    if validation > 0 and not 1 <= n_val <= r.shape[0] - 2:
        raise EvomergeError(f"validation={validation} leaves no held-out or < 2 training subjects; use 0")
    if len(cands) > 1 and n_val == 0:
        raise EvomergeError("choosing dims from a list needs validation > 0")
    if n_val:
        perm = np.random.default_rng(seed).permutation(r.shape[0])
        train, val = r[np.sort(perm[n_val:])], r[np.sort(perm[:n_val])]
        errors = [_validation_error(_fit_once(train, model, d, seed, epochs, lr), val) for d in cands]
        best = int(np.argmin(errors))
        params = _fit_once(r, model, cands[best], seed, epochs, lr)
        bias = errors[best]
    else:
        params = _fit_once(r, model, cands[0], seed, epochs, lr)
        bias = _validation_error(params, r)
    return IrtParams(model, params.a, params.b, params.theta, float(np.var(r, axis=1).mean()), bias)


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


def _neg_log_posterior(
    theta: np.ndarray, a: np.ndarray, b: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray]:
    """-log p(y | theta) - log N(theta; 0, I) (up to a constant) and its gradient in theta."""
    z = a @ theta - b
    value = float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * theta @ theta)
    return value, a.T @ (expit(z) - y) + theta


def fit_ability(params: IrtParams, idx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """MAP ability (dims,) from answers ``y`` on items ``idx``: argmax_theta sum_j log p(y_j | theta) +
    log N(theta; 0, I). The N(0, I) prior is the (standardised) training population; it keeps all-correct and
    all-wrong answers finite. Solved with L-BFGS from theta = 0."""
    idx, y = _check_subset(params, idx, y)
    res = minimize(
        _neg_log_posterior,
        np.zeros(params.dims),
        (params.a[idx], params.b[idx], y),
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
    ||a_i||^2 p_i(theta)(1 - p_i(theta)) averaged over the training abilities (N(0, I) when unknown).
    """
    if method not in SELECTORS:
        raise unknown("item selector", method, SELECTORS)
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= params.n_items:
        raise EvomergeError(f"n must be an integer in [1, {params.n_items}] (number of items); got {n!r}")
    if method == "random":
        return np.sort(np.random.default_rng(seed).choice(params.n_items, n, replace=False))
    if method == "information":
        p = params.prob(_population_theta(params))
        info = (params.a**2).sum(axis=1) * (p * (1 - p)).mean(axis=0)
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
    return np.column_stack([params.a, params.b])


def anchor_weights(params: IrtParams, idx: np.ndarray) -> np.ndarray:
    """Weights (sum 1) for the items ``idx``: w_j = share of all items whose nearest item of ``idx`` in the
    embedding [a_i, b_i] is j. For anchor items this is the share of their k-means cluster (up to items on a
    cluster border); pass them as ``weights`` to the estimators."""
    idx = np.asarray(idx)
    _check_subset(params, idx, np.zeros(len(idx)))
    x = _embedding(params)
    nearest = ((x[:, None, :] - x[idx][None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
    return np.bincount(nearest, minlength=len(idx)) / params.n_items


def _check_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise EvomergeError(f"weights must be {n} finite values >= 0 with a positive sum")
    return w / w.sum()


# What an estimator may need besides (params, idx, y): need -> (its keyword argument, how to ask for it).
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


ESTIMATORS: Registry[Estimator] = Registry("estimator", Estimator)


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
        value, grad = _neg_log_posterior(lam @ ends, params.a[idx], params.b[idx], y)
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


# --- adaptive testing ------------------------------------------------------------------------------------


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
