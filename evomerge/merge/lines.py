"""lines: task arithmetic whose scale grows linearly with depth, LiNeS (Wang et al., 2025)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.base import MergeInputs, Param, merge_method
from evomerge.merge.subspace import WEIGHT_1, affine
from evomerge.recipe import layer_of

SHALLOW = Param("shallow", "shared", default=0.5, low=-10.0, high=10.0)
DEEP = Param("deep", "shared", default=1.0, low=-10.0, high=10.0)


def depths(names: Iterable[str]) -> dict[str, float]:
    """Each tensor's relative depth: l / (L - 1) in decoder layer l of L (0 when L = 1); outside the
    layers 0 for the embeddings (a name containing ``embed``) and 1 for the rest (final norm, head)."""
    names = list(names)
    layers = [layer for layer in map(layer_of, names) if layer is not None]
    last = max(layers, default=0)
    out = {}
    for name in names:
        layer = layer_of(name)
        if layer is None:
            out[name] = 0.0 if "embed" in name else 1.0
        else:
            out[name] = layer / last if last else 0.0
    return out


def depth_scale(x: MergeInputs, shallow: float, deep: float) -> float:
    """lambda(depth) = shallow + (deep - shallow) depth; the tensor's depth comes from its Merger."""
    if x.depth is None:
        raise EvomergeError(
            f"merge method 'lines' needs the depth of tensor {x.name!r} in its model: merge through a "
            "Merger (or merge_state_dicts), or build MergeInputs with depth="
        )
    return shallow + (deep - shallow) * x.depth


@merge_method(
    "lines",
    params=[WEIGHT_1, SHALLOW, DEEP],
    reference="https://arxiv.org/abs/2410.17146",
    mergekit=False,
)
def lines(x: MergeInputs, weight: torch.Tensor, shallow: float, deep: float) -> torch.Tensor:
    """LiNeS. Task arithmetic whose scale grows linearly with the tensor's depth in the model:

        lambda(l) = shallow + (deep - shallow) l / (L - 1)      (decoder layer l of L)
        merged = base + lambda(l) sum_i w_i delta_i

    Embeddings take the shallow scale, the final norm and head the deep one. shallow = deep = lambda
    is task arithmetic with that lambda. Within a layer group it resolves depth finer than the group:
    its two genes give every layer its own scale.

    With other methods: a recipe's layer groups may use lines where other groups use tsv, ties, ...
    The scale multiplies a merged task vector, so ``depth_scale`` gives the factor that would put the
    same ramp on top of another method's output (merged' = base + lambda(l) (merged - base)); the
    Merger does not yet apply it to other methods (no recipe field for it).
    Nothing is cached.
    """
    lam = depth_scale(x, shallow, deep)
    return affine(x, [lam * float(wi) for wi in weight])
