"""The Merger: base weights and task vectors held once, any recipe written into one model in place."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch

from evomerge.errors import EvomergeError
from evomerge.merge import fused
from evomerge.merge.base import MergeInputs, MergeMethod, get_method
from evomerge.merge.kernels import STORE, Workspace, release_heap
from evomerge.merge.streams import KEYED_VERSION, Stream, make_stream
from evomerge.recipe import Recipe, layer_of

StateDict = Mapping[str, torch.Tensor]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.numel() > 0
    )


SEARCH_RANDOM = "keyed"  # the random masks of every merge a run evaluates, saves or reloads
SEARCH_SEED = 0


def check_masks_reproducible(recorded: int | None, methods: Iterable[str], run_dir: Any) -> None:
    """Refuse to redraw a run's random masks (dare_*, della*) when the run recorded another version of
    the keyed stream than this evomerge draws (None: a run from before versions were recorded, 1)."""
    recorded = 1 if recorded is None else recorded
    random = sorted({m for m in methods if get_method(m).random_masks})
    if random and recorded != KEYED_VERSION:
        raise EvomergeError(
            f"run {str(run_dir)!r} drew its {', '.join(random)} masks with keyed stream v{recorded}; "
            f"this evomerge draws v{KEYED_VERSION}, so they cannot be reproduced: start a new run "
            "(recipes without random masks are unaffected)"
        )


class Merger:
    """Holds what does not depend on the genome, so each candidate costs one pass of arithmetic.

    Kept per worker: the base (float32), each expert's task vector stacked per tensor (``deltas[name]``,
    K x shape), a cache of per-tensor statistics that methods compute on first use or in ``prepare``
    (order-statistics sketches of |delta| for TIES/breadcrumbs, norms for slerp/nuslerp, ...), and a
    workspace of scratch buffers reused by every merge. Memory: (K + 1) model sizes, plus 1/85 of a
    model per expert for the magnitude sketches and some tens of MiB of scratch.

    ``merge``/``apply`` write into ``out`` (a state dict or module whose tensors are overwritten in
    place) or into fresh tensors. Non-floating tensors (buffers such as position ids) are copied from
    the base; tensors the base shares storage with (tied embeddings) are merged once.

    ``base=None`` merges the experts as they are (a zero base), for methods that accept no base.
    ``seed`` seeds the random masks of dare_*/della*: every merge draws from a fresh generator seeded
    with it, so one recipe always gives the same weights, and the draws equal mergekit's after
    ``torch.manual_seed(seed)``. ``seed=None`` draws from torch's global generator, as mergekit does;
    a ``torch.Generator`` is drawn from as it is. ``random="keyed"`` draws the same distribution from
    a counter-based hash of (seed, tensor, expert, element): a tensor's masks are independent of the
    rest of the recipe, and dare_ties/dare_linear run as one fused compiled kernel per tensor
    (``evomerge.merge.fused``), the fast path the search's workers use.
    """

    def __init__(
        self,
        base: StateDict | None,
        experts: Mapping[Any, StateDict],
        dtype: torch.dtype = torch.float32,
        *,
        seed: int | torch.Generator | None = 0,
        random: Literal["mergekit", "keyed"] = "mergekit",
    ):
        if not experts:
            raise EvomergeError("a merge needs at least one expert model")
        self.experts = list(experts)
        self.dtype = dtype
        self.seed = seed
        self.random = random
        make_stream(random, seed)  # refuse a bad combination now
        self.zero_base = base is None
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}  # name -> the earlier name whose storage it shares
        self.cache: dict[str, dict[Any, Any]] = {}
        self.workspace = Workspace()
        k = len(self.experts)
        first = experts[self.experts[0]] if base is None else base
        self.names = list(first)
        storages: dict[tuple[Any, ...], str] = {}  # (data_ptr, shape, stride, dtype) -> first name
        for name in self.names:
            b = first[name]  # read once: a lazy mapping loads each tensor once
            key = (b.data_ptr(), tuple(b.shape), b.stride(), b.dtype)
            if b.numel() and key in storages:
                self.aliases[name] = storages[key]
                continue
            storages[key] = name
            if b.is_floating_point():
                self.base[name] = (
                    torch.zeros((), dtype=dtype).expand(b.shape)
                    if base is None
                    else b.detach().to(dtype).clone()
                )
                self.deltas[name] = torch.empty((k, *b.shape), dtype=dtype)
                self.cache[name] = {}
            else:
                self.base[name] = b.clone()
            del b
        del storages
        self.fuse = fused.worth_compiling(max((t.numel() for t in self.base.values()), default=0))
        # Experts are read one at a time, so a lazy mapping keeps only one expert in memory at once.
        for i, e in enumerate(self.experts):
            sd = experts[e]
            extra = set(sd) - set(self.base) - set(self.aliases)
            if extra:
                raise EvomergeError(f"expert {e!r} has tensors the base lacks: {sorted(extra)[:5]}")
            for name, b in self.base.items():
                if name not in sd:
                    raise EvomergeError(f"expert {e!r} has no tensor {name!r} that the base has")
                t = sd[name]
                if t.shape != b.shape:
                    raise EvomergeError(
                        f"expert {e!r} tensor {name!r} has shape {tuple(t.shape)}, base has {tuple(b.shape)}"
                    )
                if name in self.deltas:
                    torch.sub(t.detach().to(dtype), b, out=self.deltas[name][i])
            for name, owner in self.aliases.items():
                if (
                    name in sd
                    and not _same_storage(sd[name], sd[owner])
                    and not torch.equal(sd[name], sd[owner])
                ):
                    raise EvomergeError(
                        f"expert {e!r} has different tensors {name!r} and {owner!r}, which the base ties"
                    )
            del sd

    def changed_layers(self) -> set[int | None]:
        """The decoder layers (None: the tensors outside the layers) in which some expert differs from
        the base. A LoRA fine-tune, for one, leaves the embeddings and norms as they were."""
        return {layer_of(name) for name, d in self.deltas.items() if bool(d.any())}

    def nbytes(self) -> int:
        """Bytes held: base, task vectors, cached statistics and scratch."""
        total = sum(t.numel() * t.element_size() for t in self.deltas.values())
        total += sum(t.untyped_storage().nbytes() for t in self.base.values())
        for c in self.cache.values():
            for v in c.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
                elif callable(getattr(v, "nbytes", None)):
                    total += v.nbytes()
        return total + self.workspace.nbytes()

    def inputs(self, name: str, out: torch.Tensor | None = None, stream: Stream | None = None) -> MergeInputs:
        """The MergeInputs of one tensor, with this Merger's cache and workspace."""
        return MergeInputs(
            name,
            self.base[name],
            self.deltas[name],
            out=out,
            cache=self.cache[name],
            workspace=self.workspace,
            stream=stream,
            fuse=self.fuse,
        )

    def prepare(self, methods: Iterable[str]) -> None:
        """Compute now, for every tensor, the statistics ``methods`` would compute on first use.

        Tensors are prepared in parallel on ``torch.get_num_threads()`` threads (the sorts behind the
        order-statistics sketches release the GIL), each with its own scratch space."""
        hooks = []
        for m in dict.fromkeys(methods):
            method = get_method(m)
            if method.prepare is not None and method.prepare not in hooks:
                hooks.append(method.prepare)
        if not hooks:
            return

        def run(name: str, workspace: Workspace) -> None:
            x = self.inputs(name)
            x.workspace = workspace
            for hook in hooks:
                hook(x)

        threads = torch.get_num_threads()
        names = sorted(self.deltas, key=lambda n: -self.deltas[n].numel())
        if threads <= 1:
            for name in names:
                run(name, self.workspace)
            self.workspace.release("sort")  # the largest tensor's sort buffer is not needed again
            release_heap()
            return
        spaces = [Workspace() for _ in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            free = list(range(threads))
            lock = threading.Lock()

            def task(name: str) -> None:
                with lock:
                    slot = free.pop()
                try:
                    run(name, spaces[slot])
                finally:
                    with lock:
                        free.append(slot)

            list(pool.map(task, names))
        release_heap()

    def merge(self, method: str, parameters: Mapping[str, Any], out: Any = None) -> dict[str, torch.Tensor]:
        """Merge every tensor with one method; see ``apply`` for per-layer recipes."""
        return self.apply(Recipe.uniform(method, parameters), out=out)

    def apply(self, recipe: Recipe, out: Any = None) -> dict[str, torch.Tensor]:
        """Write the recipe's merged weights into ``out`` (state dict or module, in place) and return them."""
        target = out.state_dict() if isinstance(out, torch.nn.Module) else out
        resolved: dict[str, tuple[MergeMethod, dict[str, Any]]] = {}
        for g in recipe.groups:
            method = get_method(g.method)
            if self.zero_base and method.base == "required":
                raise EvomergeError(f"merge method {method.name!r} needs a base model")
            resolved[g.name] = (method, method.resolve(g.parameters, self.experts))
        stream = make_stream(self.random, self.seed)
        result: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, base_t in self.base.items():
                dest = target[name] if target is not None else None
                if name not in self.deltas:
                    merged = base_t
                else:
                    method, params = resolved[recipe.group_for(name).name]
                    direct = (
                        dest is not None
                        and dest.dtype == self.dtype
                        and dest.shape == base_t.shape
                        and dest.is_contiguous()
                    )
                    x = self.inputs(name, dest if direct else None, stream)
                    merged = method.fn(x, **params)
                if dest is not None:
                    if merged is not dest:
                        dest.copy_(merged)
                    merged = dest
                result[name] = merged
            for name, owner in self.aliases.items():
                if target is not None and not _same_storage(target[name], target[owner]):
                    target[name].copy_(result[owner])
                    result[name] = target[name]
                else:
                    result[name] = result[owner]
        self.workspace.release_large(STORE)  # masks of the largest tensors: not kept between merges
        release_heap()
        return {name: result[name] for name in self.names}
