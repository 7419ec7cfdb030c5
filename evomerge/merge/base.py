"""What a merge method is: a pure function over one tensor's inputs, with declared parameters.

Its declaration (name, ``Param`` list, input contract) lives in ``evomerge.methods``, which
imports no torch; a ``MergeMethod`` is that declaration with the kernel that implements it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.kernels import STORE, Workspace, as_float32, chunk_size, l1_float32
from evomerge.merge.orderstats import OrderSketch, Selection, select_direct
from evomerge.merge.streams import Stream, TorchStream
from evomerge.methods import BUILTIN, DECLARATIONS, BasePolicy, Declaration, Param
from evomerge.registry import Registry


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


@dataclass(frozen=True, kw_only=True)
class MergeMethod(Declaration):
    """A method: its :class:`Declaration` and ``fn(inputs, **params)``, the kernel that implements it.

    ``check(method, params, experts)`` rejects parameter combinations the ranges cannot express;
    ``prepare(inputs)`` computes a tensor's genome-independent statistics ahead of the first merge.
    """

    fn: Callable[..., torch.Tensor]
    doc: str = field(default="", repr=False)
    check: Callable[[MergeMethod, dict[str, Any], Sequence[Any]], None] | None = field(
        default=None, repr=False
    )
    prepare: Callable[[MergeInputs], None] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, declaration: Declaration, fn: Callable[..., torch.Tensor], **kernel: Any) -> MergeMethod:
        declared = {f.name: getattr(declaration, f.name) for f in fields(Declaration)}
        return cls(**declared, fn=fn, doc=fn.__doc__ or "", **kernel)

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
            self.check_range(p, value)
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
            self.check_range(p, v, e if len(experts) > 1 else None)
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device="cpu")


def floats(values: Sequence[float] | torch.Tensor) -> list[float]:
    """Per-model parameters as Python floats: a resolved parameter (``MergeMethod.resolve``) is a float64
    tensor, read with one ``tolist`` rather than element by element for every tensor merged."""
    return values.tolist() if isinstance(values, torch.Tensor) else [float(v) for v in values]


# Built-in methods register when evomerge.merge imports their modules; other packages' through the
# ``evomerge.merge_methods`` entry points.
METHODS: Registry[MergeMethod] = Registry(
    "merge method", MergeMethod, providers=("evomerge.merge",), group="evomerge.merge_methods"
)


def implements(
    name: str,
    *,
    check: Callable[[MergeMethod, dict[str, Any], Sequence[Any]], None] | None = None,
    prepare: Callable[[MergeInputs], None] | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn(inputs: MergeInputs, **params) -> Tensor`` as the kernel of the built-in method
    ``name`` declared in ``evomerge.methods.BUILTIN``."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        METHODS.add(name, MergeMethod.of(BUILTIN[name], fn, check=check, prepare=prepare))
        return fn

    return register


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
    """Declare a method and register ``fn(inputs: MergeInputs, **params) -> Tensor`` as its kernel:
    how a package outside evomerge adds one (its declaration then also checks configs)."""
    declared = Declaration(
        name,
        tuple(params),
        reference,
        min_experts,
        max_experts,
        base,
        random_masks,
        cache_models,
        mergekit,
        sketches,
    )

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        method = METHODS.add(name, MergeMethod.of(declared, fn, check=check, prepare=prepare))
        DECLARATIONS.setdefault(name, method)
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    return METHODS.get(name)


def per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape (K,) per-model values (``resolve`` makes them on the CPU) on ``like``'s device and in its
    dtype, shaped to broadcast against the (K, *shape) stack ``like``."""
    return values.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))
