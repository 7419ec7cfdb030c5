"""lines: task arithmetic whose scale grows linearly with depth, LiNeS (Wang et al., 2025); and the
same depth scaling as a modifier on top of any method (a layer group's ``lines: {shallow, deep}``)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.base import MergeInputs, floats, implements
from evomerge.merge.subspace import add_delta, affine
from evomerge.methods import MODIFIER
from evomerge.recipe import layer_of


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


@implements("lines")
def lines(x: MergeInputs, weight: torch.Tensor, shallow: float, deep: float) -> torch.Tensor:
    """LiNeS. Task arithmetic whose scale grows linearly with the tensor's depth in the model:

        lambda(l) = shallow + (deep - shallow) l / (L - 1)      (decoder layer l of L)
        merged = base + lambda(l) sum_i w_i delta_i

    Embeddings take the shallow scale, the final norm and head the deep one. shallow = deep = lambda
    is task arithmetic with that lambda. Within a layer group it resolves depth finer than the group:
    its two genes give every layer its own scale.

    With other methods: a recipe's layer groups may use lines where other groups use tsv, ties, ...
    The scale multiplies a merged task vector, so ``depth_scale`` gives the factor that puts the same
    ramp on top of another method's output (merged' = base + lambda(l) (merged - base)); the
    Merger applies it to another method's output where a layer group carries the modifier
    ``lines: {shallow, deep}`` (``rescale``).
    Nothing is cached.
    """
    lam = depth_scale(x, shallow, deep)
    return affine(x, [lam * wi for wi in floats(weight)])


def modifier_scales(group: str, values: Any) -> tuple[float, float]:
    """(shallow, deep) of layer group ``group``'s lines modifier (a mapping; a missing scale takes its
    default), each checked against the declared range; one line naming the group and the scale."""
    if not isinstance(values, Mapping):
        raise EvomergeError(
            f"group {group!r} lines modifier must be a mapping {{shallow: s, deep: d}}, got {values!r}"
        )
    names = [p.name for p in MODIFIER]
    extra = sorted(map(str, set(values) - set(names)))
    if extra:
        raise EvomergeError(
            f"group {group!r} lines modifier has no scale {extra[0]!r}; its scales: {', '.join(names)}"
        )
    scales = []
    for p in MODIFIER:
        v = values.get(p.name, p.default)
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) or not p.admits(float(v)):
            raise EvomergeError(f"group {group!r} lines modifier {p.name}={v!r} is outside {p.bounds}")
        scales.append(float(v))
    return scales[0], scales[1]


def rescale(x: MergeInputs, merged: torch.Tensor, shallow: float, deep: float) -> torch.Tensor:
    """The lines modifier on one tensor a method merged: base + lambda(depth) (merged - base), with
    lambda(depth) = shallow + (deep - shallow) depth as in ``lines``, computed in float32 and written
    into the output. In a 16-bit compute dtype the method's result is rounded before the scaling and
    the scaled one again (twice in all); a float32 temporary of the tensor's size."""
    lam = depth_scale(x, shallow, deep)
    if lam == 1.0:
        return merged
    delta = merged.to(torch.float32) - x.base.to(torch.float32)  # a new tensor: ``merged`` may be the output
    return add_delta(x, delta, lam)
