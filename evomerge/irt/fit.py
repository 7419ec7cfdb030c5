"""Fitting IRT item parameters with py-irt (:func:`fit_irt`): the number of dimensions chosen on held-out
answers, py-irt's parameterisations converted to the package's, the training abilities standardised."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from evomerge.errors import EvomergeError, unknown
from evomerge.irt.ability import fit_ability
from evomerge.irt.params import DEFAULT_MULTIDIM_DIMS, MODELS, IrtParams, _check_responses, _from_pyirt


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
