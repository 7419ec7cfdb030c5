"""A recipe: the plain, serialisable description of one merged model.

Decoder layers are split into contiguous layer groups; tensors outside the layers (embeddings, final
norm, lm_head) form the group ``other``. Each group has a merge method and that method's parameters,
and optionally the LiNeS modifier ``lines: {shallow, deep}``, which scales the method's merged task
vector by a factor linear in depth (``evomerge.merge.lines``).

A recipe may also carry a data flow (``flow``, layer stacking): the sequence of decoder layers a token
passes through, each step a layer of one of the worker's models (``merge``: the parameter-space merge
the groups describe, ``base``, or an expert) with the scale of the hidden state entering it
(``evomerge.flow``). Without one, the model has the base's layers in order.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
OTHER = "other"
MERGE = "merge"  # the data-flow source that is the candidate's own parameter-space merge


def layer_of(tensor_name: str) -> int | None:
    """The decoder layer index a tensor belongs to, or None for tensors outside the layers."""
    m = _LAYER.search(tensor_name)
    return int(m.group(1)) if m else None


def split_layers(num_layers: int, num_groups: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) layer ranges, as even as possible."""
    num_groups = max(1, min(num_groups, num_layers))
    bounds = [round(i * num_layers / num_groups) for i in range(num_groups + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(num_groups)]


@dataclass(frozen=True)
class GroupRecipe:
    """One layer group: layers [start, stop) (None for ``other``), its method and parameters, and
    ``lines`` ({"shallow": s, "deep": d}, or None): the method's merged task vector is scaled by
    s + (d - s) depth in each tensor (LiNeS on top of any method)."""

    name: str
    method: str
    parameters: Mapping[str, Any]
    layers: tuple[int, int] | None = None
    lines: Mapping[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        # a deep copy: the recipe is immutable, so nothing done to the dict may reach it
        d: dict[str, Any] = {
            "name": self.name,
            "method": self.method,
            "parameters": copy.deepcopy(dict(self.parameters)),
        }
        if self.layers is not None:
            d["layers"] = list(self.layers)
        if self.lines is not None:  # absent otherwise, so recipes without it keep their keys
            d["lines"] = dict(self.lines)
        return d


@dataclass(frozen=True)
class FlowStep:
    """One step of a data flow: decoder layer ``layer`` of model ``source``, its input hidden state
    multiplied by ``scale`` (1 where the step continues the previous one: the next layer of the same
    model)."""

    source: str
    layer: int
    scale: float = 1.0

    def to_list(self) -> list[Any]:
        return [self.source, self.layer, self.scale]


@dataclass(frozen=True)
class Recipe:
    groups: tuple[GroupRecipe, ...]
    flow: tuple[FlowStep, ...] | None = None

    @property
    def depth(self) -> int | None:
        """Decoder layers of the model a data flow makes (None: the base's own)."""
        return None if self.flow is None else len(self.flow)

    @classmethod
    def uniform(cls, method: str, parameters: Mapping[str, Any]) -> Recipe:
        """One method and parameter set for every tensor."""
        return cls((GroupRecipe(OTHER, method, dict(parameters)),))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        return cls(
            tuple(
                GroupRecipe(
                    g["name"],
                    g["method"],
                    copy.deepcopy(dict(g["parameters"])),
                    tuple(g["layers"]) if "layers" in g else None,
                    dict(g["lines"]) if g.get("lines") is not None else None,
                )
                for g in d["groups"]
            ),
            None if d.get("flow") is None else tuple(FlowStep(s, int(i), float(x)) for s, i, x in d["flow"]),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"groups": [g.to_dict() for g in self.groups]}
        if self.flow is not None:  # absent otherwise, so recipes without one keep their keys
            d["flow"] = [step.to_list() for step in self.flow]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def key(self) -> str:
        """Identity of the merged weights: identical recipes are evaluated once."""
        return hashlib.sha1(self.to_json().encode()).hexdigest()[:16]

    def group_for(self, tensor_name: str) -> GroupRecipe:
        layer = layer_of(tensor_name)
        fallback = None
        for g in self.groups:
            if g.layers is None:
                fallback = g
            elif layer is not None and g.layers[0] <= layer < g.layers[1]:
                return g
        if fallback is None:
            raise ValueError(f"recipe has no group for tensor {tensor_name!r}")
        return fallback


def reference_recipes(experts: list[str]) -> dict[str, Recipe]:
    """Recipes whose merge is exactly the base or one expert, so the inputs are scored through the same
    path as every merge."""
    refs = {"base": Recipe.uniform("task_arithmetic", {"weight": 0.0})}
    for e in experts:
        refs[e] = Recipe.uniform("linear", {"weight": {x: float(x == e) for x in experts}})
    return refs
