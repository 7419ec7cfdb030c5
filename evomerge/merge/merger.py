"""The Merger: base weights and task vectors held once, any recipe written into one model in place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.base import MergeInputs, MergeMethod, get_method
from evomerge.recipe import Recipe

StateDict = Mapping[str, torch.Tensor]


class Merger:
    """Holds what does not depend on the genome: the base (fp32) and each expert's task vector.

    ``merge``/``apply`` then cost one pass of the method's arithmetic per tensor, written into ``out``
    (a state dict or module whose tensors are overwritten in place) or into fresh tensors.
    Non-floating tensors (buffers such as position ids) are copied from the base.
    """

    def __init__(self, base: StateDict, experts: Mapping[str, StateDict], dtype: torch.dtype = torch.float32):
        if not experts:
            raise EvomergeError("a merge needs at least one expert model")
        self.experts = list(experts)
        self.dtype = dtype
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        k = len(self.experts)
        for name, b in base.items():
            if b.is_floating_point():
                self.base[name] = b.detach().to(dtype).clone()
                self.deltas[name] = torch.empty((k, *b.shape), dtype=dtype)
            else:
                self.base[name] = b.clone()
        # Experts are read one at a time, so a lazy mapping keeps only one expert in memory at once.
        for i, e in enumerate(self.experts):
            sd = experts[e]
            extra = set(sd) - set(self.base)
            if extra:
                raise EvomergeError(f"expert {e!r} has tensors the base lacks: {sorted(extra)[:5]}")
            for name, b in self.base.items():
                if name not in sd:
                    raise EvomergeError(f"expert {e!r} has no tensor {name!r} that the base has")
                if sd[name].shape != b.shape:
                    raise EvomergeError(
                        f"expert {e!r} tensor {name!r} has shape {tuple(sd[name].shape)}, "
                        f"base has {tuple(b.shape)}"
                    )
                if name in self.deltas:
                    torch.sub(sd[name].detach().to(dtype), b, out=self.deltas[name][i])
            del sd

    def merge(self, method: str, parameters: Mapping[str, Any], out: Any = None) -> dict[str, torch.Tensor]:
        """Merge every tensor with one method; see ``apply`` for per-layer recipes."""
        return self.apply(Recipe.uniform(method, parameters), out=out)

    def apply(self, recipe: Recipe, out: Any = None) -> dict[str, torch.Tensor]:
        """Write the recipe's merged weights into ``out`` (state dict or module, in place) and return them."""
        target = out.state_dict() if isinstance(out, torch.nn.Module) else out
        resolved: dict[str, tuple[MergeMethod, dict[str, Any]]] = {}
        for g in recipe.groups:
            method = get_method(g.method)
            resolved[g.name] = (method, method.resolve(g.parameters, self.experts))
        result: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, base_t in self.base.items():
                if name not in self.deltas:
                    merged = base_t
                else:
                    method, params = resolved[recipe.group_for(name).name]
                    merged = method.fn(MergeInputs(name, base_t, self.deltas[name]), **params)
                if target is not None:
                    target[name].copy_(merged)
                    result[name] = target[name]
                else:
                    result[name] = merged
        return result
