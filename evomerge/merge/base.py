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
from evomerge.merge.kernels import STORE, Workspace, as_float32, chunk_size, l1_float32
from evomerge.merge.orderstats import OrderSketch, Selection, select_direct
from evomerge.merge.streams import Stream, TorchStream
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


class MergeInputs:
    """The inputs to one output tensor: the base and the experts' task vectors (``deltas``, K x shape).

    Besides the tensors it carries what a ``Merger`` provides to make a method fast: ``out`` (the
    preallocated output to write into, in the task vectors' dtype, or None), a per-tensor ``cache``
    of genome-independent statistics that outlives the merge, a ``workspace`` of reusable scratch
    buffers and the random ``stream`` of the stochastic methods, and ``fuse``: whether compiled
    kernels may run this tensor however small, because the model it belongs to is large enough to pay
    their one-time compile (None: decided by this tensor's size alone). Built by hand (``MergeInputs(name, base, deltas)``)
    it works the same, computing everything on the spot.

    Everything a method creates lives on ``device``, the task vectors' device (a GPU's, say): the
    workspace hands out buffers there and ``chunk`` is that device's loop chunk size.

    ``depth``: the tensor's relative depth in the model, 0 (the embeddings, the first decoder layer)
    to 1 (the last decoder layer, the final norm and head), which a Merger derives from the tensor
    names; depth-scaled methods (lines) need it. None: unknown.
    """

    def __init__(
        self,
        name: str,
        base: torch.Tensor,
        deltas: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        cache: dict[Any, Any] | None = None,
        workspace: Workspace | None = None,
        stream: Stream | None = None,
        fuse: bool | None = None,
        depth: float | None = None,
    ) -> None:
        self.name = name
        self.fuse = fuse
        self.depth = depth
        self.base = base
        self.deltas = deltas
        self.out = out
        self.persistent = cache is not None
        self.cache: dict[Any, Any] = cache if cache is not None else {}
        self.device = deltas.device
        self.chunk = chunk_size(self.device)
        self.workspace = (workspace if workspace is not None else Workspace()).on(self.device)
        self.stream = stream if stream is not None else TorchStream()

    @property
    def n_experts(self) -> int:
        return self.deltas.shape[0]

    @property
    def numel(self) -> int:
        return self.base.numel()

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.base] + [self.base + d for d in self.deltas]

    def flat_base(self) -> torch.Tensor:
        return self.base.reshape(-1)

    def delta(self, i: int) -> torch.Tensor:
        """Expert i's task vector, flat (a view)."""
        return self.deltas[i].reshape(-1)

    def output(self) -> torch.Tensor:
        """The flat output to write into, in the task vectors' dtype and on their device (``out``, or a
        fresh tensor kept as ``out``)."""
        if self.out is None:
            self.out = torch.empty(self.base.shape, dtype=self.deltas.dtype, device=self.device)
        return self.out.view(-1)

    def result(self) -> torch.Tensor:
        assert self.out is not None
        return self.out

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """A genome-independent statistic: computed once per tensor and worker when a Merger owns us."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def abs_sum(self, i: int) -> torch.Tensor:
        """sum |delta_i| as a float32 scalar, reduced as mergekit's ``tensor.abs().sum()`` (bit-identical
        for a given thread count; a one-time full-size temporary)."""

        def compute() -> torch.Tensor:
            d = self.delta(i)
            if d.numel() > STORE:  # a transient rather than a workspace buffer kept at this size
                return l1_float32(d)
            whole = self.workspace.buf("whole", d.numel())
            return torch.abs(as_float32(d, whole), out=whole).sum()

        return self.cached(("abs_sum", i), compute)

    def magnitude_select(self, i: int, rank: int, ties: bool = True) -> Selection:
        """The ``rank``-th smallest |delta_i| (0-based), exactly, with the count below it and (``ties``)
        the indices equal to it: a sketch lookup, plus one pass when needed, under a Merger;
        ``kthvalue`` otherwise."""
        d = self.delta(i)
        if not self.persistent:
            return select_direct(d, rank, ties)
        sketch = self.cached(("order", i), lambda: OrderSketch(d, self.workspace.buf("sort", d.numel())))
        return sketch.select(rank, lambda sl, buf: as_float32(d[sl], buf), self.workspace, ties)


BasePolicy = Literal["required", "optional", "input"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: ``fn(inputs, **params)`` and its declaration.

    ``base`` says what the base model is to the method (mergekit's input contract): ``"required"``,
    the reference the task vectors are taken from; ``"optional"`` (nuslerp), without one the experts
    are used as they are; ``"input"`` (linear), one more weighted input (``base_weight``).
    ``check(params, experts)`` rejects parameter combinations the ranges cannot express;
    ``prepare(inputs)`` computes a tensor's genome-independent statistics ahead of the first merge.
    ``random_masks``: the merge draws random masks from ``inputs.stream`` (dare_*, della*).
    ``mergekit``: mergekit has this method, with these semantics (False: evomerge's own; its recipes
    export as merged weights, not as a mergekit configuration).
    ``cache_models``: (a, b), the genome-independent cache the method keeps per tensor on the merging
    device is at most a + b K float32 model sizes (the subspace methods' SVD factors), for the plan.
    ``sketches``: its ``prepare`` builds order-statistics (magnitude) sketches of each tensor, whose sort
    is a worker's largest one-time transient (the plan counts it).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    reference: str = ""
    min_experts: int = 1
    max_experts: int | None = None
    doc: str = field(default="", repr=False)
    base: BasePolicy = "required"
    check: Callable[[MergeMethod, dict[str, Any], Sequence[Any]], None] | None = field(
        default=None, repr=False
    )
    prepare: Callable[[MergeInputs], None] | None = field(default=None, repr=False)
    random_masks: bool = False
    cache_models: tuple[float, float] = (0.0, 0.0)
    mergekit: bool = True
    sketches: bool = False

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

    def resolve(self, parameters: Mapping[str, Any], experts: Sequence[Any]) -> dict[str, Any]:
        """Check ``parameters`` against the declaration and return them ready for ``fn``: per-model
        values become float tensors of shape (K,) in ``experts`` order, defaults filled in."""
        self.check_count(len(experts))
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
        if self.check is not None:
            self.check(self, out, experts)
        return out

    def _resolve_value(self, p: Param, value: Any, experts: Sequence[Any]) -> Any:
        if p.scope == "shared":
            self._check_range(p, value)
            return p.kind(value)
        if isinstance(value, Mapping):
            missing = [e for e in experts if e not in value]
            extra = [e for e in value if e not in experts]
            if missing or extra:
                raise EvomergeError(
                    f"merge method {self.name!r} parameter {p.name!r}: values given for {sorted(map(str, value))}, "
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
        for v, e in zip(values, experts, strict=True):
            self._check_range(p, v, e if len(experts) > 1 else None)
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device="cpu")

    def _check_range(self, p: Param, value: Any, expert: Any = None) -> None:
        of = f" (expert {expert!r})" if expert is not None else ""
        if p.kind is bool:
            if not isinstance(value, bool):
                raise EvomergeError(
                    f"merge method {self.name!r} parameter {p.name!r} must be true or false{of}"
                )
            return
        if isinstance(value, torch.Tensor) and value.numel() == 1:
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


# Built-in methods register when evomerge.merge imports their modules; other packages' through the
# ``evomerge.merge_methods`` entry points.
METHODS: Registry[MergeMethod] = Registry(
    "merge method", MergeMethod, providers=("evomerge.merge",), group="evomerge.merge_methods"
)


def merge_method(
    name: str,
    *,
    params: Sequence[Param],
    reference: str = "",
    min_experts: int = 1,
    max_experts: int | None = None,
    base: BasePolicy = "required",
    check: Callable[[MergeMethod, dict[str, Any], Sequence[Any]], None] | None = None,
    prepare: Callable[[MergeInputs], None] | None = None,
    random_masks: bool = False,
    cache_models: tuple[float, float] = (0.0, 0.0),
    mergekit: bool = True,
    sketches: bool = False,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn(inputs: MergeInputs, **params) -> Tensor`` under ``name`` with its parameters."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        METHODS.add(
            name,
            MergeMethod(
                name,
                fn,
                tuple(params),
                reference,
                min_experts,
                max_experts,
                fn.__doc__ or "",
                base,
                check,
                prepare,
                random_masks,
                cache_models,
                mergekit,
                sketches,
            ),
        )
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    return METHODS.get(name)


def per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape (K,) per-model values (``resolve`` makes them on the CPU) on ``like``'s device and in its
    dtype, shaped to broadcast against the (K, *shape) stack ``like``."""
    return values.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))
