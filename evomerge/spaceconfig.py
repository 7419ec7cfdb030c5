"""What a ``search_space:`` may say (``SearchSpaceConfig``, its ``data_flow:`` block) and how a space is
named: a catalogue name (``searchspaces/``), a YAML path, or a mapping whose keys override the named
space's. The genome built from it is :mod:`evomerge.searchspace`'s."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge import catalog
from evomerge.errors import EvomergeError, read_yaml
from evomerge.methods import MODIFIER, declaration


class DataFlowConfig(BaseModel):
    """What a search space's ``data_flow:`` block may say (layer stacking)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers_from: tuple[str, ...] | None = Field(
        None,
        min_length=1,
        description="the models whose layers the slots offer: merge (the candidate's parameter-space "
        "merge), base, expert names; default merge and the experts, or with parameter_space: false the "
        "base and the experts",
    )
    repeats: int = Field(2, ge=1, description="r: the slots are r passes over the M decoder layers (T = M r)")
    max_layers: int | None = Field(
        None, ge=1, description="at most this many layers: the used slots past it are dropped (default T)"
    )
    scale: float | tuple[float, float] = Field(
        (0.5, 1.5),
        description="the scale of the hidden state at each transition between models: a number (fixed) or "
        "[low, high] (a gene per slot); positive",
    )


class SearchSpaceConfig(BaseModel):
    """What a search-space YAML (or the ``search_space`` block of a run config) may say."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, description="catalogue entry or YAML path to start from")
    layer_groups: int = Field(
        1, ge=1, description="contiguous groups of decoder layers, each with its own genes"
    )
    methods: tuple[str, ...] = Field(("task_arithmetic",), min_length=1)
    genes: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"weight": (0.0, 1.0)},
        description="searched parameters and their [low, high] bounds (one gene per expert for per-model ones)",
    )
    fixed: dict[str, Any] = Field(default_factory=dict, description="shared parameters set for every group")
    lines: dict[str, float | tuple[float, float]] | None = Field(
        None,
        description="the LiNeS modifier on every searched group (its merged task vector scaled linearly "
        "with depth): shallow and deep each a number (fixed) or [low, high] (a gene per group); a scale "
        "left out is fixed at its default (shallow 0.5, deep 1); absent: no modifier",
    )
    parameter_space: bool = Field(
        True, description="false: no per-group genes, the merge is the base (a data flow alone)"
    )
    data_flow: DataFlowConfig | None = Field(None, description="search the layers a token passes through too")

    @model_validator(mode="after")
    def _check_flow(self) -> SearchSpaceConfig:
        flow = self.data_flow
        if flow is None:
            if not self.parameter_space:
                raise EvomergeError(
                    "search space has nothing to search: parameter_space is false and there is no data_flow"
                )
            return self
        scale = flow.scale
        low, high = scale if isinstance(scale, tuple) else (scale, scale)
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise EvomergeError(
                f"search_space.data_flow.scale {list(scale) if isinstance(scale, tuple) else scale} must be "
                "positive and finite (a number, or [low, high] with 0 < low <= high)"
            )
        names = flow.layers_from or ()
        if len(set(names)) != len(names):
            raise EvomergeError(f"search_space.data_flow.layers_from names a model twice: {list(names)}")
        return self

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        for m in methods:
            declaration(m)
        return methods

    @model_validator(mode="after")
    def _check_lines(self) -> SearchSpaceConfig:
        if self.lines is None:
            return self
        scales = {p.name: p for p in MODIFIER}
        for name, value in self.lines.items():
            if name not in scales:
                raise EvomergeError(
                    f"search space lines modifier has no scale {name!r}; its scales: {', '.join(scales)}"
                )
            p = scales[name]
            if isinstance(value, tuple):
                low, high = value
                if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                    raise EvomergeError(
                        f"search space gene 'lines.{name}' bounds [{low}, {high}] must be finite, low <= high"
                    )
                if not (p.admits(low) and p.admits(high)):
                    raise EvomergeError(
                        f"search space gene 'lines.{name}' bounds [{low}, {high}] are outside {p.bounds}"
                    )
            elif not (math.isfinite(value) and p.admits(value)):
                raise EvomergeError(f"search space lines modifier {name}={value} is outside {p.bounds}")
        return self

    @model_validator(mode="after")
    def _check_genes(self) -> SearchSpaceConfig:
        declared = {p.name: p for m in self.methods for p in declaration(m).params}
        for name, (low, high) in self.genes.items():
            if name not in declared:
                raise EvomergeError(
                    f"search space gene {name!r} is not a parameter of {list(self.methods)}; "
                    f"their parameters: {', '.join(sorted(declared))}"
                )
            p = declared[name]
            if not (math.isfinite(low) and math.isfinite(high)):
                raise EvomergeError(
                    f"search space gene {name!r} bounds [{low}, {high}] must be finite numbers"
                )
            if p.kind is bool:
                raise EvomergeError(
                    f"search space gene {name!r} is a true/false parameter; set it under `fixed:` instead"
                )
            if not low <= high:
                raise EvomergeError(f"search space gene {name!r} bounds [{low}, {high}]: low exceeds high")
            if p.name == "density" and not (low >= 0.0 and high <= 1.0):
                raise EvomergeError(f"search space gene {name!r} bounds [{low}, {high}] are outside [0, 1]")
            if not (p.admits(low) and p.admits(high)):
                raise EvomergeError(
                    f"search space gene {name!r} bounds [{low}, {high}] are outside {p.bounds}"
                )
        if not self.genes and len(self.methods) == 1 and self.data_flow is None:
            raise EvomergeError(
                f"search space has nothing to search: no `genes:` and one method ({self.methods[0]}); "
                "add genes from its numeric parameters "
                f"({', '.join(sorted(n for n, p in declared.items() if p.kind is not bool)) or 'none'}) "
                "or more methods"
            )
        for m in self.methods if self.parameter_space else ():  # else every candidate would fail to merge
            missing = [
                p.name
                for p in declaration(m).params
                if p.required and p.name not in {**self.genes, **self.fixed}
            ]
            if missing:
                raise EvomergeError(
                    f"search space method {m!r} needs parameter {missing[0]!r}: search it under `genes:` "
                    "or set it under `fixed:`"
                )
        for name, value in self.fixed.items():
            if name not in declared:
                raise EvomergeError(
                    f"search space fixed parameter {name!r} is not a parameter of {list(self.methods)}; "
                    f"their parameters: {', '.join(sorted(declared))}"
                )
            if name in self.genes:
                raise EvomergeError(
                    f"search space parameter {name!r} is both searched (genes) and fixed; keep one of them"
                )
            for m in self.methods:  # the merge would refuse the value on every candidate: refuse it now
                method = declaration(m)
                p = next((p for p in method.params if p.name == name), None)
                if p is None:
                    continue
                per_model = p.scope == "model" and isinstance(value, Mapping | list | tuple)
                for v in (value.values() if isinstance(value, Mapping) else value) if per_model else [value]:
                    try:
                        method.check_range(p, v)
                    except EvomergeError as e:
                        raise EvomergeError(f"search space fixed parameter {name!r}: {e}") from None
        return self


def load_space_config(spec: SearchSpaceConfig | dict[str, Any] | str) -> SearchSpaceConfig:
    """A search-space config from a catalogue name, a YAML path, or a dict whose ``name`` is overridden."""
    if isinstance(spec, SearchSpaceConfig):
        return spec
    return SearchSpaceConfig.model_validate(space_data(spec))


def space_data(spec: dict[str, Any] | str) -> dict[str, Any]:
    """The unvalidated keys of a search space: those of the catalogue entry or YAML file that ``spec``
    names (a name, or a dict's ``name``), overridden by the dict's own."""
    if not isinstance(spec, str | dict):
        raise EvomergeError(
            f"search_space must be a catalogue name, a YAML path or a mapping of keys, got {spec!r}"
        )
    overrides = {"name": spec} if isinstance(spec, str) else dict(spec)
    base: dict[str, Any] = {}
    name = overrides.get("name")
    if name is not None and not isinstance(name, str):
        raise EvomergeError(f"search_space.name must be a catalogue name or a YAML path, got {name!r}")
    if name:
        path = catalog.find("searchspaces", name)
        base = read_yaml(path, "search space file") or {}
        if not isinstance(base, dict):
            raise EvomergeError(f"search space file {str(path)!r} must hold a mapping of keys")
        base.pop("name", None)
    return {**base, **overrides}
