"""Item response theory (IRT): estimate a model's full-benchmark accuracy from its 0/1 answers on a few items.

One parameterisation everywhere in this module (tinyBenchmarks' ``item_curve``, with a guessing rate)::

    p_i(theta) = g_i + (1 - g_i) sigmoid(a_i . theta - b_i)

``a_i`` (``dims`` values, > 0) is item i's discrimination, ``b_i`` its difficulty, ``theta`` a subject's
ability (``dims`` values) and ``g_i`` in [0, 1) its guessing rate: 0 for the 2PL models ("2pl",
"multidim_2pl"), fitted or loaded for "3pl" (1 dimension). Every consumer (ability fit, estimators, item
information, adaptive tests) uses this p_i; ATLAS-style intercepts (``a theta + d``) are ``b = -d``. py-irt's parameterisations are converted when parameters are fitted or loaded:
``"2pl"`` has logit ``alpha_i (theta - beta_i)``, so ``a_i = alpha_i`` and ``b_i = alpha_i beta_i``;
``"multidim_2pl"`` has logit ``sum_d gamma_id (theta_d - beta_id)``, so ``a_i = gamma_i`` and
``b_i = sum_d gamma_id beta_id``. When training abilities are known the latent scale is standardised
(``theta -> (theta - mu) / sd``, ``a -> a sd``, ``b -> b - a . mu``, which leaves every p_i unchanged), so the
training abilities have mean 0 and sd 1 in each dimension and N(0, I) is the training population's
ability distribution: :func:`fit_ability` uses it as prior.

Typical use: ``params = fit_irt(responses)`` on a calibration matrix (subjects x items), ``idx =
select_items(params, 20, "anchor")``, evaluate a new model on those items only, then
``estimate_accuracy(params, idx, y, "gpirt", weights=anchor_weights(params, idx))``.

New items join a fitted bank without refitting it: :func:`link_items` (or ``fit_irt(..., fixed=params)``)
fits only their parameters, the bank's held fixed and the subjects' abilities estimated from the bank's items.

For a merge population, where every subject is a point in a genome space, :func:`fit_surrogate` fits a
Gaussian process of accuracy over genomes on calibration merges; ``estimator="sgpirt"`` fuses its
prediction for a candidate's genome with the gp-IRT estimate from the candidate's items.

Estimators are registered in ``ESTIMATORS`` with what they need besides a subject's answers
(:func:`estimator`): the config validates names against it and calibration asks it what to pass, so a new
estimator is one decorated function here.

The package is split by role: :mod:`~evomerge.irt.params` (item parameters and their fit),
:mod:`~evomerge.irt.ability` (a subject's ability, which items to ask), :mod:`~evomerge.irt.estimators`
(the estimator registry and its estimators) and :mod:`~evomerge.irt.adaptive` (adaptive testing); every
public name is importable from ``evomerge.irt``.
"""

from __future__ import annotations

from typing import Any

from evomerge.irt.ability import anchor_weights, fit_ability, select_items
from evomerge.irt.adaptive import (
    STOPS,
    AdaptiveCheck,
    AdaptiveResult,
    ability_covariance,
    accuracy_estimate,
    adaptive_test,
    check_adaptive,
    most_informative,
)
from evomerge.irt.estimators import (
    ESTIMATORS,
    NEEDS,
    Estimator,
    Surrogate,
    estimate_accuracy,
    estimate_gmpirt,
    estimate_gpirt,
    estimate_irt,
    estimate_mean,
    estimate_mpirt,
    estimate_pirt,
    estimate_sgpirt,
    estimator,
    fit_merge_ability,
    fit_surrogate,
    get_estimator,
    gp_lambda,
    gp_variance,
)
from evomerge.irt.fit import fit_irt, link_items
from evomerge.irt.params import (
    ANCHOR_VARIANCE_FACTOR,
    DEFAULT_MULTIDIM_DIMS,
    FORMAT,
    MIN_SURROGATE_MERGES,
    MODELS,
    SELECTORS,
    IrtParams,
    simulate_2pl,
)

__all__ = [
    "ANCHOR_VARIANCE_FACTOR",
    "DEFAULT_MULTIDIM_DIMS",
    "ESTIMATORS",
    "FORMAT",
    "MIN_SURROGATE_MERGES",
    "MODELS",
    "NEEDS",
    "SELECTORS",
    "STOPS",
    "AdaptiveCheck",
    "AdaptiveResult",
    "Estimator",
    "IrtParams",
    "Surrogate",
    "ability_covariance",
    "accuracy_estimate",
    "adaptive_test",
    "anchor_weights",
    "check_adaptive",
    "estimate_accuracy",
    "estimate_gmpirt",
    "estimate_gpirt",
    "estimate_irt",
    "estimate_mean",
    "estimate_mpirt",
    "estimate_pirt",
    "estimate_sgpirt",
    "estimator",
    "fit_ability",
    "fit_irt",
    "fit_merge_ability",
    "fit_surrogate",
    "get_estimator",
    "gp_lambda",
    "gp_variance",
    "link_items",
    "most_informative",
    "select_items",
    "simulate_2pl",
]


def __getattr__(name: str) -> Any:
    if name == "PRIOR_ESTIMATORS":  # the names of the estimators that need a prior (derived, for callers)
        return tuple(n for n in ESTIMATORS if ESTIMATORS.get(n).needs_prior)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
