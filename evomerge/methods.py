"""What each merge method is, apart from its kernel: its name, parameters and input contract.

This module imports no torch and no kernel, so a config or search space is checked against the
methods' declarations without loading either. ``BUILTIN`` is the only list of the built-in methods'
parameters: each kernel module implements its entry (``@implements("ties", ...)`` in
``evomerge.merge.base``), and a method from another package declares itself with ``merge_method``,
which adds to ``DECLARATIONS`` as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from evomerge.errors import EvomergeError
from evomerge.registry import Registry

REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    ``scope="model"`` takes one value per input model (mergekit's per-model parameters such as
    ``weight`` and ``density``); ``scope="shared"`` takes one value for the tensor group.
    ``low``/``high`` bound the allowed values (inclusive, or ``low`` excluded when ``open_low``: a rank
    fraction in (0, 1]); a search space may only search inside them.
    """

    name: str
    scope: Literal["model", "shared"]
    default: Any = REQUIRED
    kind: type = float
    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False

    @property
    def bounds(self) -> str:
        return f"{'(' if self.open_low else '['}{self.low}, {self.high}]"

    def admits(self, value: float) -> bool:
        return (self.low < value if self.open_low else self.low <= value) and value <= self.high

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


BasePolicy = Literal["required", "optional", "input"]


@dataclass(frozen=True)
class Declaration:
    """A merge method's declaration.

    ``base`` says what the base model is to the method (mergekit's input contract): ``"required"``,
    the reference the task vectors are taken from; ``"optional"`` (nuslerp), without one the experts
    are used as they are; ``"input"`` (linear), one more weighted input (``base_weight``).
    ``random_masks``: the merge draws random masks from its inputs' stream (dare_*, della*).
    ``mergekit``: mergekit has this method, with these semantics (False: evomerge's own; its recipes
    export as merged weights, not as a mergekit configuration).
    ``cache_models``: (a, b), the genome-independent cache the method keeps per tensor on the merging
    device is at most a + b K float32 model sizes (the subspace methods' SVD factors), for the plan.
    ``sketches``: it builds order-statistics (magnitude) sketches of each tensor ahead of the first
    merge, whose sort is a worker's largest one-time transient (the plan counts it).
    ``kept_tables``: under keyed masks it keeps a kept-l1 table per large tensor and expert
    (``evomerge.merge.fused.KeptTable``, ``shapes.KEPT_TABLE_BYTES`` each; the plan counts them).
    """

    name: str
    params: tuple[Param, ...]
    reference: str = ""
    min_experts: int = 1
    max_experts: int | None = None
    base: BasePolicy = "required"
    random_masks: bool = False
    cache_models: tuple[float, float] = (0.0, 0.0)
    mergekit: bool = True
    sketches: bool = False
    kept_tables: bool = False

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise EvomergeError(
            f"merge method {self.name!r} has no parameter {name!r}; "
            f"its parameters: {', '.join(p.name for p in self.params)}"
        )

    def check_count(self, k: int) -> None:
        """Refuse a number of experts (inputs besides the base) the method cannot merge."""
        if k >= self.min_experts and (self.max_experts is None or k <= self.max_experts):
            return
        if self.min_experts == self.max_experts:
            allowed = f"exactly {self.min_experts}"
        elif self.max_experts is None:
            allowed = f"at least {self.min_experts}"
        else:
            allowed = f"{self.min_experts} to {self.max_experts}"
        if self.base == "required":
            raise EvomergeError(
                f"merge method {self.name!r} needs the base and {allowed} other model(s), got {k}"
            )
        besides = " besides the optional base" if self.base == "optional" else ""
        raise EvomergeError(f"merge method {self.name!r} needs {allowed} expert model(s){besides}, got {k}")

    def check_range(self, p: Param, value: Any, expert: Any = None) -> None:
        """Refuse a value of ``p`` outside its bounds (or not true/false for a flag); a one-element
        tensor counts as its number."""
        of = f" (expert {expert!r})" if expert is not None else ""
        if p.kind is bool:
            if not isinstance(value, bool):
                raise EvomergeError(
                    f"merge method {self.name!r} parameter {p.name!r} must be true or false{of}"
                )
            return
        if hasattr(value, "numel") and value.numel() == 1:
            value = value.item()
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or math.isnan(value)
            or not p.admits(float(value))
        ):
            raise EvomergeError(
                f"merge method {self.name!r} parameter {p.name!r}={value!r} is outside {p.bounds}{of}"
            )


# Parameters several methods share (mergekit's names and ranges).
WEIGHT = Param("weight", "model", low=-10.0, high=10.0)
WEIGHT_1 = Param("weight", "model", default=1.0, low=-10.0, high=10.0)
DENSITY = Param("density", "model", default=1.0, low=0.0, high=1.0)
LAMBDA = Param("lambda", "shared", default=1.0, low=-10.0, high=10.0)
# ``lambda`` scales the merged task vector in the subspace methods too (the papers' alpha), so one
# ``lambda`` gene means the same thing whichever method a layer group draws.
SCALE = LAMBDA
INT8_MASK = Param("int8_mask", "shared", default=False, kind=bool)  # mask storage type only: no effect
GAMMA = Param("gamma", "model", default=0.01, low=0.0, high=1.0)
EPSILON = Param("epsilon", "model", default=0.15, low=0.0, high=1.0)
SHALLOW = Param("shallow", "shared", default=0.5, low=-10.0, high=10.0)
DEEP = Param("deep", "shared", default=1.0, low=-10.0, high=10.0)
MODIFIER = (SHALLOW, DEEP)  # the lines modifier's scales: the same declaration as the lines method's


def flag(name: str, default: bool) -> Param:
    return Param(name, "shared", default=default, kind=bool)


def gta_params(*, normalize: bool, rescale: bool, extra: Sequence[Param] = ()) -> tuple[Param, ...]:
    """The declaration mergekit gives every generalized-task-arithmetic method (its defaults differ)."""
    return (
        WEIGHT,
        DENSITY,
        *extra,
        flag("normalize", normalize),
        flag("rescale", rescale),
        LAMBDA,
        INT8_MASK,
    )


def rank_fraction(default: float) -> Param:
    return Param("rank_fraction", "shared", default=default, low=0.0, high=1.0, open_low=True)


def fraction(name: str, default: float, **kw: Any) -> Param:
    return Param(name, "shared", default=default, low=0.0, high=1.0, **kw)


_ARXIV = "https://arxiv.org/abs/"
BUILTIN: dict[str, Declaration] = {
    d.name: d
    for d in [
        Declaration(
            "linear",
            (
                WEIGHT,
                Param("base_weight", "shared", default=0.0, low=-10.0, high=10.0),
                flag("normalize", True),
            ),
            _ARXIV + "2203.05482",
            base="input",
        ),
        Declaration("task_arithmetic", (WEIGHT, flag("normalize", False), LAMBDA), _ARXIV + "2212.04089"),
        Declaration(
            "ties",
            (WEIGHT, DENSITY, flag("normalize", True), LAMBDA, INT8_MASK),
            _ARXIV + "2306.01708",
            sketches=True,
        ),
        Declaration(
            "dare_linear",
            gta_params(normalize=False, rescale=True),
            _ARXIV + "2311.03099",
            random_masks=True,
            kept_tables=True,
        ),
        Declaration(
            "dare_ties",
            gta_params(normalize=False, rescale=True),
            _ARXIV + "2311.03099",
            random_masks=True,
            kept_tables=True,
        ),
        Declaration(
            "breadcrumbs",
            gta_params(normalize=False, rescale=False, extra=[GAMMA]),
            _ARXIV + "2312.06795",
            sketches=True,
        ),
        Declaration(
            "breadcrumbs_ties",
            gta_params(normalize=False, rescale=False, extra=[GAMMA]),
            _ARXIV + "2312.06795",
            sketches=True,
        ),
        Declaration(
            "della",
            gta_params(normalize=True, rescale=True, extra=[EPSILON]),
            _ARXIV + "2406.11617",
            random_masks=True,
            cache_models=(0.0, 0.5),  # the ranks of each task vector in its rows, 16 bits each
        ),
        Declaration(
            "della_linear",
            gta_params(normalize=False, rescale=True, extra=[EPSILON]),
            _ARXIV + "2406.11617",
            random_masks=True,
            cache_models=(0.0, 0.5),  # the ranks of each task vector in its rows, 16 bits each
        ),
        Declaration("sce", (fraction("select_topk", 1.0), INT8_MASK), _ARXIV + "2408.07990", sketches=True),
        Declaration(
            "slerp",
            (Param("t", "shared", low=0.0, high=1.0),),
            "https://en.wikipedia.org/wiki/Slerp",
            min_experts=1,
            max_experts=1,
        ),
        Declaration(
            "nuslerp",
            (WEIGHT, flag("nuslerp_row_wise", False), flag("nuslerp_flatten", True)),
            min_experts=2,
            max_experts=2,
            base="optional",
        ),
        Declaration("model_stock", (flag("filter_wise", False),), _ARXIV + "2403.19522", min_experts=2),
        Declaration("lines", (WEIGHT_1, SHALLOW, DEEP), _ARXIV + "2410.17146", mergekit=False),
        Declaration("magmax", (WEIGHT_1, SCALE), _ARXIV + "2407.06322", min_experts=2, mergekit=False),
        Declaration(
            "tsv",
            (WEIGHT_1, rank_fraction(1.0), SCALE),
            _ARXIV + "2412.00081",
            min_experts=2,
            mergekit=False,
            cache_models=(0.0, 1.0),
        ),
        Declaration(
            "cart",
            (WEIGHT_1, rank_fraction(0.1), SCALE),
            _ARXIV + "2412.12153",
            min_experts=2,
            mergekit=False,
            cache_models=(0.0, 3.0),  # the K SVDs (up to 2 K matrices) and the K truncated matrices
        ),
        Declaration(
            "star",
            (WEIGHT_1, fraction("eta", 0.4, open_low=True), SCALE),
            _ARXIV + "2502.10339",
            mergekit=False,
            cache_models=(0.0, 3.0),  # the K SVDs (up to 2 K matrices) and the K truncated matrices
        ),
        Declaration("iso_c", (SCALE,), _ARXIV + "2502.04959", mergekit=False, cache_models=(1.0, 0.0)),
        Declaration(
            "iso_cts",
            (fraction("common_space_fraction", 0.8), SCALE),
            _ARXIV + "2502.04959",
            min_experts=2,
            mergekit=False,
            cache_models=(3.0, 0.0),
        ),
    ]
}

# Every method's declaration: the built-in ones from the table above, other packages' when their
# ``evomerge.merge_methods`` entry point is imported (their ``merge_method`` adds them here).
DECLARATIONS: Registry[Declaration] = Registry("merge method", Declaration, group="evomerge.merge_methods")
for _name, _declaration in BUILTIN.items():
    DECLARATIONS.add(_name, _declaration)


def declaration(name: str) -> Declaration:
    """The declaration of merge method ``name``, without importing its kernel (or torch) for a
    built-in one; an unknown name is refused with the registered ones."""
    return DECLARATIONS.get(name)
