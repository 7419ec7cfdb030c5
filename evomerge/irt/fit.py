"""Fitting IRT item parameters with py-irt (:func:`fit_irt`): the number of dimensions chosen on held-out
answers, py-irt's parameterisations converted to the package's, the training abilities standardised; and
linking new items to a fitted bank (:func:`link_items`, fixed item parameter calibration)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize

from evomerge.errors import EvomergeError, unknown
from evomerge.irt.ability import _neg_log_lik_z, fit_ability
from evomerge.irt.params import DEFAULT_MULTIDIM_DIMS, MODELS, IrtParams, _check_responses, _from_pyirt

GUESS_INIT = 0.1  # py-irt's 3PL starts its guessing rates at 1 (p = 1 everywhere, no gradient): start here


def _dims_candidates(model: str, dims: int | Sequence[int] | None) -> list[int]:
    if model not in MODELS:
        raise unknown("IRT model", model, MODELS)
    if dims is None:
        return [DEFAULT_MULTIDIM_DIMS if model == "multidim_2pl" else 1]
    cands = [dims] if isinstance(dims, (int, np.integer)) else list(dims)
    if not cands or any(not isinstance(d, (int, np.integer)) or d < 1 for d in cands):
        raise EvomergeError(f"dims must be an integer >= 1 or a list of them; got {dims!r}")
    if model in ("2pl", "3pl") and cands != [1]:
        raise EvomergeError(f"IRT model '{model}' has dims 1; got {dims!r} (use 'multidim_2pl')")
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
    from py_irt.models import Multidim2PL, ThreeParamLog, TwoParamLog
    from pyro.infer import SVI, Trace_ELBO
    from torch.distributions import constraints

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
        elif model == "3pl":
            irt = ThreeParamLog(num_items=n_items, num_subjects=n_subjects)
            # registered first, so the model's pyro.param("lambdas", ones) finds it and keeps this start
            pyro.param("lambdas", torch.full((n_items,), GUESS_INIT), constraint=constraints.unit_interval)
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
    keys = ("disc", "diff", "ability") + (("lambdas",) if model == "3pl" else ())
    finite = all(np.isfinite(np.asarray(export[k], dtype=float)).all() for k in keys)
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
    fixed: IrtParams | None = None,
) -> IrtParams:
    """Fit IRT parameters to a 0/1 subjects x items matrix with py-irt (see the module docstring for p_i).

    ``model``: "2pl" (1 dimension), "3pl" (1 dimension, py-irt's ThreeParamLog: a guessing rate per item,
    started at 0.1) or "multidim_2pl" (``dims`` dimensions, default 2; a list of candidates
    picks the one with the lowest validation error, as tinyBenchmarks does). ``fixed``: known parameters of
    the first ``fixed.n_items`` columns, held fixed; only the other columns are fitted, by :func:`link_items`
    (no py-irt, ``model``, ``dims``, ``epochs``, ``lr`` and ``validation`` unused), and the result is the
    whole bank, the fixed items first. ``validation``: the share of
    subjects held out (seeded) for a first fit whose validation error (:func:`_validation_error`) is the
    ``irt_bias`` gp-IRT uses; 0 measures it in-sample on the final fit (optimistic). The final fit uses all
    subjects; ``response_variance`` = mean over subjects of the variance of their responses over items.
    A fit whose loss or parameters turn NaN is retried once (seed + 1, lr / 2), then RuntimeError.
    """
    if fixed is not None:
        r = np.asarray(responses, dtype=float)
        k = fixed.n_items
        if r.ndim != 2 or r.shape[1] <= k:
            raise EvomergeError(
                f"with fixed parameters of {k} items, responses need more than {k} columns; got shape {r.shape}"
            )
        return _concat(fixed, link_items(fixed, r[:, :k], r[:, k:]))
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
    variance = float(np.var(r, axis=1).mean())
    return IrtParams(model, params.a, params.b, params.theta, variance, bias, params.g)


def _concat(first: IrtParams, second: IrtParams) -> IrtParams:
    g = None if first.g is None else np.concatenate([first.g, second.g])
    return IrtParams(
        first.model,
        np.vstack([first.a, second.a]),
        np.concatenate([first.b, second.b]),
        first.theta,
        first.response_variance,
        first.irt_bias,
        g,
    )


def _check_partial(responses: np.ndarray, n_items: int | None, what: str) -> np.ndarray:
    """0/1 with NaN for "not answered": subjects x items."""
    r = np.asarray(responses, dtype=float)
    if r.ndim != 2 or (n_items is not None and r.shape[1] != n_items):
        cols = "items" if n_items is None else f"{n_items} items"
        raise EvomergeError(f"{what} must be a subjects x {cols} matrix; got shape {r.shape}")
    if not np.isin(r[~np.isnan(r)], (0.0, 1.0)).all():
        raise EvomergeError(f"{what} must be 0/1 (NaN: not answered); allowed values are 0, 1 and NaN")
    return r


def link_items(
    params: IrtParams,
    known: np.ndarray | None,
    new: np.ndarray,
    *,
    theta: np.ndarray | None = None,
    max_iter: int = 500,
) -> IrtParams:
    """Fixed item parameter calibration: parameters for new items on the scale of a fitted bank.

    The known items' parameters (``params``) stay as they are. Each subject's ability is its MAP ability
    (:func:`fit_ability`) from its answers ``known`` (subjects x ``params.n_items``) on the known items, or
    ``theta`` (subjects x dims) when given. Then, with those abilities fixed, every new item's a_i, b_i (3PL:
    and g_i) maximise sum_s log p(new_si | theta_s) + log prior, where the prior is the known bank's own
    spread: a_id ~ N(mean, sd of the known a_d), b_i ~ N(mean, 2 x sd of the known b), g_i ~ N(mean known
    g, 0.1^2); it keeps items every subject gets right (or wrong) finite. a stays >= 0.001 where every known
    a is positive; g stays in [0, 0.95]. ``new`` is subjects x new items of 0/1, NaN where a subject did not
    answer (the likelihood skips it; so may ``known``). All items are fitted at once by one L-BFGS-B over
    a separable objective: thousands of items take seconds. Returns the new items' IrtParams (model, training
    abilities and calibration statistics of ``params``).
    """
    y = _check_partial(new, None, "new responses")
    if theta is None:
        if known is None:
            raise EvomergeError("link_items needs the known items' responses or theta")
        k = _check_partial(known, params.n_items, "known responses")
        if len(k) != len(y):
            raise EvomergeError(
                f"known and new responses must have the same subjects; got {len(k)} and {len(y)}"
            )
        rows = []
        for row in k:
            seen = np.flatnonzero(~np.isnan(row))
            rows.append(fit_ability(params, seen, row[seen]) if len(seen) else np.zeros(params.dims))
        th = np.array(rows)
    else:
        th = np.asarray(theta, dtype=float).reshape(len(y), -1)
        if th.shape[1] != params.dims or not np.isfinite(th).all():
            raise EvomergeError(f"theta must be finite (subjects, {params.dims}); got {th.shape}")
    n, d = y.shape[1], params.dims
    mask = ~np.isnan(y)
    y0 = np.where(mask, y, 0.0)
    a_mu, a_sd = params.a.mean(axis=0), np.maximum(params.a.std(axis=0), 0.1)
    b_mu, b_sd = float(params.b.mean()), 2 * max(float(params.b.std()), 0.5)
    guess = params.g is not None
    g_mu, g_sd = (float(params.g.mean()), 0.1) if guess else (0.0, 1.0)

    def unpack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        a = x[: n * d].reshape(n, d)
        b = x[n * d : n * d + n]
        return a, b, (x[n * d + n :] if guess else None)

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        a, b, g = unpack(x)
        z = th @ a.T - b  # subjects x items
        if g is None:
            nll, dz = _neg_log_lik_z(z, y0, None)
        else:
            nll, dz = _neg_log_lik_z(z, y0, np.broadcast_to(g, z.shape))
        nll, dz = np.where(mask, nll, 0.0), np.where(mask, dz, 0.0)
        value = nll.sum() + 0.5 * (((a - a_mu) / a_sd) ** 2).sum() + 0.5 * (((b - b_mu) / b_sd) ** 2).sum()
        grads = [(dz.T @ th + (a - a_mu) / a_sd**2).ravel(), -dz.sum(axis=0) + (b - b_mu) / b_sd**2]
        if g is not None:
            # d(-log lik)/dg = -(y (1 - s) / p - (1 - y) / (1 - g)), s = sigmoid(z), p = g + (1 - g) s
            s = 1 / (1 + np.exp(-z))
            p = g + (1 - g) * s
            dg = np.where(mask, -(y0 * (1 - s) / p - (1 - y0) / (1 - g)), 0.0).sum(axis=0)
            value += 0.5 * (((g - g_mu) / g_sd) ** 2).sum()
            grads.append(dg + (g - g_mu) / g_sd**2)
        return float(value), np.concatenate(grads)

    a_low = 1e-3 if (params.a > 0).all() else None
    x0 = np.concatenate(
        [np.tile(np.maximum(a_mu, 1e-3) if a_low else a_mu, n), np.full(n, b_mu)]
        + ([np.full(n, g_mu)] if guess else [])
    )
    bounds = [(a_low, None)] * (n * d) + [(None, None)] * n + ([(0.0, 0.95)] * n if guess else [])
    res = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": max_iter})
    a, b, g = unpack(res.x)
    return IrtParams(params.model, a, b, params.theta, params.response_variance, params.irt_bias, g)
