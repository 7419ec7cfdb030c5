"""What a merge method is: a pure function over one tensor's inputs, with declared parameters.

The declaration (``Param``) is the only list of a method's parameters: configs, search spaces and
exports all read it from the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from evomerge.errors import EvomergeError
from evomerge.registry import Registry

REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    ``scope="model"`` takes one value per input model (mergekit's per-model parameters such as
    ``weight`` and ``density``); ``scope="shared"`` takes one value for the tensor group.
    ``low``/``high`` bound the allowed values (inclusive); a search space may only search inside them.
    """

    name: str
    scope: Literal["model", "shared"]
    default: Any = REQUIRED
    kind: type = float
    low: float = -math.inf
    high: float = math.inf

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


class MergeInputs:
    """The inputs to one output tensor: the base and the experts' task vectors (``deltas``, K x shape).

    Methods that need the experts' own weights read ``tensors`` (base first, then each expert); methods
    that need magnitude order statistics call ``magnitude_mask``, which a ``Merger`` serves from its cache.
    """

    def __init__(
        self,
        name: str,
        base: torch.Tensor,
        deltas: torch.Tensor,
        thresholds: Callable[[int, float], torch.Tensor] | None = None,
    ) -> None:
        self.name = name
        self.base = base
        self.deltas = deltas
        self._thresholds = thresholds

    @property
    def n_experts(self) -> int:
        return self.deltas.shape[0]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.base] + [self.base + d for d in self.deltas]

    def magnitude_threshold(self, i: int, density: float) -> torch.Tensor:
        """The k-th largest |delta_i| with k = max(1, int(density * numel)): top-k is ``|delta_i| >= it``."""
        if self._thresholds is not None:
            return self._thresholds(i, density)
        flat = self.deltas[i].abs().reshape(-1)
        k = max(1, int(density * flat.numel()))
        return torch.kthvalue(flat, flat.numel() - k + 1).values

    def magnitude_mask(self, i: int, density: float) -> torch.Tensor:
        """Keep-mask of the ``density`` fraction of largest-magnitude entries of delta_i (mergekit's
        ``magnitude`` sparsification: at least one entry survives any positive density)."""
        if density >= 1:
            return torch.ones_like(self.deltas[i], dtype=torch.bool)
        if density <= 0:
            return torch.zeros_like(self.deltas[i], dtype=torch.bool)
        return self.deltas[i].abs() >= self.magnitude_threshold(i, density)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    reference: str = ""
    min_experts: int = 1
    max_experts: int | None = None
    doc: str = field(default="", repr=False)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise EvomergeError(
            f"merge method {self.name!r} has no parameter {name!r}; "
            f"its parameters: {', '.join(p.name for p in self.params)}"
        )

    def resolve(self, parameters: Mapping[str, Any], experts: Sequence[str]) -> dict[str, Any]:
        """Check ``parameters`` against the declaration and return them ready for ``fn``: per-model
        values become float tensors of shape (K,) in ``experts`` order, defaults filled in."""
        k = len(experts)
        if k < self.min_experts or (self.max_experts is not None and k > self.max_experts):
            allowed = (
                f"exactly {self.min_experts}"
                if self.min_experts == self.max_experts
                else f"at least {self.min_experts}"
            )
            raise EvomergeError(f"merge method {self.name!r} needs {allowed} expert model(s), got {k}")
        for name in parameters:
            self.param(name)
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in parameters:
                value = parameters[p.name]
            elif p.required:
                raise EvomergeError(f"merge method {self.name!r} needs parameter {p.name!r}")
            else:
                value = p.default
            out[p.name] = self._resolve_value(p, value, experts)
        return out

    def _resolve_value(self, p: Param, value: Any, experts: Sequence[str]) -> Any:
        if p.scope == "shared":
            self._check_range(p, value)
            return p.kind(value)
        if isinstance(value, Mapping):
            missing = [e for e in experts if e not in value]
            extra = [e for e in value if e not in experts]
            if missing or extra:
                raise EvomergeError(
                    f"merge method {self.name!r} parameter {p.name!r}: values given for {sorted(value)}, "
                    f"expected one per expert: {list(experts)}"
                )
            values = [value[e] for e in experts]
        elif isinstance(value, (list, tuple)):
            if len(value) != len(experts):
                raise EvomergeError(
                    f"merge method {self.name!r} parameter {p.name!r}: {len(value)} values given, "
                    f"expected one per expert ({len(experts)})"
                )
            values = list(value)
        else:
            values = [value] * len(experts)
        for v in values:
            self._check_range(p, v)
        return torch.tensor([float(v) for v in values], dtype=torch.float64)

    def _check_range(self, p: Param, value: Any) -> None:
        if p.kind is bool:
            if not isinstance(value, bool):
                raise EvomergeError(f"merge method {self.name!r} parameter {p.name!r} must be true or false")
            return
        if not isinstance(value, (int, float)) or not (p.low <= float(value) <= p.high):
            raise EvomergeError(
                f"merge method {self.name!r} parameter {p.name!r}={value!r} is outside [{p.low}, {p.high}]"
            )


METHODS: Registry[MergeMethod] = Registry("merge method")


def merge_method(
    name: str,
    *,
    params: Sequence[Param],
    reference: str = "",
    min_experts: int = 1,
    max_experts: int | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn(inputs: MergeInputs, **params) -> Tensor`` under ``name`` with its parameters."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        METHODS.add(
            name,
            MergeMethod(name, fn, tuple(params), reference, min_experts, max_experts, fn.__doc__ or ""),
        )
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    return METHODS.get(name)


def per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape (K,) per-model values so they broadcast against a (K, *shape) stack."""
    return values.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))
