"""IRT item parameters (:class:`IrtParams`, saved as JSON) and their fit with py-irt (:func:`fit_irt`).

The parameterisation is the package's: ``p_i(theta) = sigmoid(a_i . theta - b_i)`` (see :mod:`evomerge.irt`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit

from evomerge.errors import EvomergeError, unknown

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
