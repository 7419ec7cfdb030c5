"""The search space owns the genome: its layout, bounds and decoding into a Recipe.

A genome x lives in [0, 1]^n. For each layer group (plus the ``other`` group of tensors outside the
layers) it holds, in order: a method gene when more than one method is allowed (the method is
``methods[floor(x * M)]``), one gene per searched shared parameter (slerp's ``t``, ``lambda``, ...), one
per searched scale of the lines modifier (``lines.shallow``, ``lines.deep``), then for each expert one
gene per searched per-model parameter (``weight``, ``density``, ...), each mapped linearly onto its
bounds. Parameters the chosen method does not declare are ignored; the lines modifier applies to
whichever method a group draws.

A data-flow space (``data_flow:``, Sakana's layer stacking; ``evomerge.flow`` builds the model) adds,
after those, T = M r slot genes (M decoder layers, r ``repeats``): slot t offers layer t mod M, and its
gene picks who provides it, ``[skip, *layers_from][floor(x * (S + 1))]`` for S models, as a method gene
picks a method; then, where the scale is searched, one scale gene per slot: the hidden state entering a
used slot is multiplied by it where the slot does not simply continue the previous one (the next layer of
the same model), the paper's transition matrix W read along the path. The used slots, in order and at
most ``max_layers`` of them, are the candidate's layers. With ``parameter_space: false`` the groups get
no genes and the merge is the base (data flow alone, over fixed models).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.merge import get_method
from evomerge.methods import MODIFIER
from evomerge.recipe import MERGE, OTHER, FlowStep, GroupRecipe, Recipe, reference_recipes, split_layers
from evomerge.spaceconfig import DataFlowConfig, SearchSpaceConfig
from evomerge.spaceconfig import load_space_config as load_space_config  # re-exported
from evomerge.spaceconfig import space_data as space_data  # re-exported

EXACT_METHODS = ("task_arithmetic", "linear")  # weight 1 on one expert, 0 on the others: that expert


@dataclass(frozen=True)
class Gene:
    group: str
    expert: str | None  # None for a method gene or a shared parameter
    param: str  # "method" for a method gene
    low: float
    high: float


class SearchSpace:
    """Genes and bounds for one model set; ``decode(x) -> Recipe`` and ``encode(recipe) -> x``.

    ``changed_layers`` (the decoder layers, None for the tensors outside them, in which some expert
    differs from the base; :meth:`evomerge.merge.Merger.changed_layers`) makes the groups no expert
    changed inert: every merge method gives back the base there, so they get no genes and decode to
    task_arithmetic with weight 0 (the base). Without it every group is searched."""

    def __init__(
        self,
        config: SearchSpaceConfig,
        experts: list[str],
        num_layers: int,
        changed_layers: Collection[int | None] | None = None,
    ):
        self.config = config
        self.experts = list(experts)
        if num_layers > 0 and config.layer_groups > num_layers:
            raise EvomergeError(
                f"search_space.layer_groups is {config.layer_groups} but the base model has "
                f"{num_layers} decoder layers; use at most {num_layers} groups"
            )
        ranges = split_layers(num_layers, config.layer_groups)
        self.groups: list[tuple[str, tuple[int, int] | None]] = [
            (f"layers_{a}-{b - 1}", (a, b)) for a, b in ranges
        ] + [(OTHER, None)]
        for m in config.methods:
            get_method(m).check_count(len(self.experts))
        self.inert: set[str] = set()
        if not config.parameter_space:
            self.inert = {g for g, _ in self.groups}
        elif changed_layers is not None:
            changed = set(changed_layers)
            self.inert = {
                g
                for g, layers in self.groups
                if (None not in changed if layers is None else not changed & set(range(*layers)))
            }
            if len(self.inert) == len(self.groups):
                raise EvomergeError(
                    "no expert differs from the base in any tensor: there is nothing to merge"
                )
        shared = {p.name for m in config.methods for p in get_method(m).params if p.scope == "shared"}
        lines = config.lines or {}
        # the lines modifier: its searched scales are genes, the others fixed (None: no modifier)
        self.lines_genes = {n: v for n, v in lines.items() if isinstance(v, tuple)}
        self.lines_fixed: dict[str, float] | None = (
            None
            if config.lines is None
            else {
                p.name: float(lines.get(p.name, p.default))
                for p in MODIFIER
                if p.name not in self.lines_genes
            }
        )
        self.genes: list[Gene] = []
        for group, _ in self.groups:
            if group in self.inert:
                continue
            if len(config.methods) > 1:
                self.genes.append(Gene(group, None, "method", 0.0, 1.0))
            for param, (low, high) in config.genes.items():
                if param in shared:
                    self.genes.append(Gene(group, None, param, low, high))
            for scale, (low, high) in self.lines_genes.items():
                self.genes.append(Gene(group, None, f"lines.{scale}", low, high))
            for expert in self.experts:
                for param, (low, high) in config.genes.items():
                    if param not in shared:
                        self.genes.append(Gene(group, expert, param, low, high))
        self.flow = None if config.data_flow is None else FlowSpace(config.data_flow, self, num_layers)
        if self.flow is not None:
            self.genes += self.flow.genes

    @property
    def n_var(self) -> int:
        return len(self.genes)

    @property
    def _flow_start(self) -> int:
        """Where the data-flow genes begin (they come last): the number of parameter-space genes."""
        return self.n_var - (0 if self.flow is None else len(self.flow.genes))

    def decode(self, x: np.ndarray) -> Recipe:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.n_var,):
            raise EvomergeError(f"genome has shape {x.shape}, search space expects ({self.n_var},)")
        if np.any(x < 0) or np.any(x > 1) or not np.all(np.isfinite(x)):
            raise EvomergeError("genome values must lie in [0, 1]")
        values: dict[str, dict[str, Any]] = {g: {} for g, _ in self.groups}
        methods = {g: self.config.methods[0] for g, _ in self.groups}
        for gene, xi in zip(self.genes[: self._flow_start], x[: self._flow_start], strict=True):
            if gene.param == "method":
                m = len(self.config.methods)
                methods[gene.group] = self.config.methods[min(int(xi * m), m - 1)]
            else:
                value = round(gene.low + float(xi) * (gene.high - gene.low), 6)
                if gene.expert is None:
                    values[gene.group][gene.param] = value
                else:
                    values[gene.group].setdefault(gene.param, {})[gene.expert] = value
        groups = []
        for group, layers in self.groups:
            if group in self.inert:
                groups.append(
                    GroupRecipe(
                        group, "task_arithmetic", {"weight": dict.fromkeys(self.experts, 0.0)}, layers
                    )
                )
                continue
            declared = {p.name for p in get_method(methods[group]).params}
            params = {k: v for k, v in values[group].items() if k in declared}
            params.update({k: v for k, v in self.config.fixed.items() if k in declared})
            lines = None
            if self.lines_fixed is not None:
                searched = {
                    p.name: values[group][f"lines.{p.name}"] for p in MODIFIER if p.name in self.lines_genes
                }
                lines = {p.name: {**self.lines_fixed, **searched}[p.name] for p in MODIFIER}
            groups.append(GroupRecipe(group, methods[group], params, layers, lines))
        flow = None if self.flow is None else self.flow.decode(x[self._flow_start :])
        return Recipe(tuple(groups), flow)

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome of a recipe (parameters the recipe lacks map to the middle of their bounds)."""
        by_group = {g.name: g for g in recipe.groups}
        x = np.full(self.n_var, 0.5)
        if self.flow is not None:
            x[self._flow_start :] = self.flow.encode(recipe.flow)
        for i, gene in enumerate(self.genes[: self._flow_start]):
            g = by_group[gene.group]
            if gene.param == "method":
                m = len(self.config.methods)
                x[i] = (self.config.methods.index(g.method) + 0.5) / m
                continue
            scale = gene.param.removeprefix("lines.") if gene.param.startswith("lines.") else None
            if scale is not None and g.lines is not None and scale in g.lines:
                value = g.lines[scale]
            elif scale is None and gene.param in g.parameters:
                value = g.parameters[gene.param]
                if gene.expert is not None:
                    value = value[gene.expert]
            else:
                continue
            span = gene.high - gene.low
            x[i] = 0.0 if span == 0 else (value - gene.low) / span
        return np.clip(x, 0.0, 1.0)

    def expert_genome(self, expert: str) -> np.ndarray:
        """The genome whose merge is exactly ``expert``: in every group task_arithmetic or linear
        (whichever the space allows first) with weight 1 for ``expert``, 0 for the others, lambda 1, and
        a data flow through one model's layers in order. Refused, naming what is missing, where the space
        cannot express it."""
        what = f"expert {expert!r}"
        if not self.config.parameter_space:
            return self._with_flow(np.full(self.n_var, 0.5), expert, what)
        method = next((m for m in self.config.methods if m in EXACT_METHODS), None)
        if method is None:
            raise EvomergeError(
                f"search space cannot reproduce an expert: its methods {list(self.config.methods)} "
                f"include none of {', '.join(EXACT_METHODS)}"
            )
        x = self._exact_genome(method, {e: float(e == expert) for e in self.experts}, what)
        return self._with_flow(x, expert, what)

    def base_genome(self) -> np.ndarray:
        """The genome whose merge is exactly the base: task_arithmetic with weight 0 on every expert in
        every group, and a data flow through one model's layers in order. Refused, naming what is
        missing, where the space cannot express it."""
        if not self.config.parameter_space:
            return self._with_flow(np.full(self.n_var, 0.5), "base", "the base")
        if "task_arithmetic" not in self.config.methods:
            raise EvomergeError(
                f"search space cannot reproduce the base: its methods {list(self.config.methods)} "
                "do not include task_arithmetic"
            )
        x = self._exact_genome("task_arithmetic", dict.fromkeys(self.experts, 0.0), "the base")
        return self._with_flow(x, "base", "the base")

    def _with_flow(self, x: np.ndarray, model: str, what: str) -> np.ndarray:
        """``x`` with its data-flow genes set to ``model``'s own layers in order: through the merge where
        the slots offer it (the merge is then ``model``), else through ``model``'s layers."""
        if self.flow is None:
            return x
        offered = self.flow.sources
        source = MERGE if MERGE in offered else model
        if source not in offered:
            raise EvomergeError(
                f"search space cannot reproduce {what}: search_space.data_flow.layers_from {list(offered)} "
                f"offers neither {MERGE} nor {model}"
            )
        x = x.copy()
        x[self._flow_start :] = self.flow.identity(source, what)
        return x

    def reference_recipes(self) -> dict[str, Recipe]:
        """The base's and each expert's recipe (``evomerge.recipe.reference_recipes``), with the data
        flow through the merge's own layers where the space has one, so that the inputs are scored
        through the same path as the candidates (and have a depth)."""
        refs = reference_recipes(self.experts)
        if self.flow is None:
            return refs
        identity = self.flow.identity_flow(MERGE)
        return {name: Recipe(r.groups, identity) for name, r in refs.items()}

    def _exact_genome(self, method: str, weights: dict[str, float], what: str) -> np.ndarray:
        defaults = {p.name: p.default for p in get_method(method).params}
        params: dict[str, Any] = {"weight": weights, **({"lambda": 1.0} if "lambda" in defaults else {})}
        # a lines modifier scales the task vectors: 1 at every depth keeps them (the base has none)
        unit = None if self.lines_fixed is None else {p.name: 1.0 for p in MODIFIER}
        x = self.encode(
            Recipe(tuple(GroupRecipe(g, method, params, layers, unit) for g, layers in self.groups))
        )
        scaled = any(weights.values())
        for g in self.decode(x).groups:
            if g.name in self.inert:  # the base, which equals every expert there
                continue
            got = {k: g.parameters.get(k, defaults[k]) for k in params}
            if g.method != method or got != params or (scaled and g.lines not in (None, unit)):
                lines = f" lines {g.lines}" if g.lines is not None else ""
                raise EvomergeError(
                    f"search space cannot reproduce {what} in group {g.name!r}: it decodes to "
                    f"{g.method} {got}{lines}; weight bounds must include 0 and 1 (lambda's and the lines "
                    "scales', 1) and neither fixed"
                )
        return x

    def layout(self) -> str:
        """Where the genes come from, in words: groups x genes per group, and the data-flow slots."""
        searched = len(self.groups) - len(self.inert)
        flow = [] if self.flow is None else [self.flow.layout()]
        if not searched:
            return "; ".join(["no parameter-space genes (the merge is the base)", *flow])
        per_group = self._flow_start // searched
        return "; ".join(
            [
                f"{searched} layer groups (search_space.layer_groups + 'other') x "
                f"{per_group} genes for {len(self.experts)} experts",
                *flow,
            ]
        )

    def describe(self) -> list[str]:
        return [f"{g.group}/{g.expert}/{g.param}" if g.expert else f"{g.group}/{g.param}" for g in self.genes]


def flow_sources(config: SearchSpaceConfig, experts: list[str]) -> list[str]:
    """The models whose layers a data flow's slots offer: ``layers_from``, by default the merge and the
    experts (without a parameter space: the base and the experts); [] without a data flow."""
    flow = config.data_flow
    if flow is None:
        return []
    return list(flow.layers_from or ([MERGE] if config.parameter_space else ["base"]) + experts)


class FlowSpace:
    """The data-flow genes of a search space (see the module docstring): T = M r slot genes, then, where
    the scale is searched, T scale genes; ``decode`` gives the used slots as FlowSteps."""

    def __init__(self, config: DataFlowConfig, space: SearchSpace, num_layers: int):
        self.config = config
        self.num_layers = num_layers
        known = ([MERGE] if space.config.parameter_space else []) + ["base", *space.experts]
        self.sources = flow_sources(space.config, space.experts)
        for name in self.sources:
            if name not in known:
                why = (
                    f" ({MERGE} is the candidate's parameter-space merge, and parameter_space is false)"
                    if name == MERGE
                    else ""
                )
                raise EvomergeError(
                    f"search_space.data_flow.layers_from names unknown model {name!r}{why}; "
                    f"known: {', '.join(known)}"
                )
        self.slots = num_layers * config.repeats
        if num_layers < 1:
            raise EvomergeError("search_space.data_flow needs decoder layers; the base model has none")
        self.max_layers = config.max_layers or self.slots
        if self.max_layers > self.slots:
            raise EvomergeError(
                f"search_space.data_flow.max_layers is {self.max_layers} but {config.repeats} repeats of the "
                f"{num_layers} decoder layers give {self.slots} slots, which cannot fill it; use max_layers "
                f"<= {self.slots} or more repeats"
            )
        self.scale = config.scale if isinstance(config.scale, tuple) else None
        self.scaled = config.scale != 1.0  # a transition may scale the hidden state
        self.genes = [Gene(f"flow_{t}", None, "source", 0.0, 1.0) for t in range(self.slots)]
        if self.scale is not None:
            self.genes += [Gene(f"flow_{t}", None, "scale", *self.scale) for t in range(self.slots)]

    def decode(self, x: np.ndarray) -> tuple[FlowStep, ...]:
        choices = len(self.sources) + 1  # skip, then each source
        picks = [min(int(v * choices), choices - 1) for v in x[: self.slots]]
        used = [(t, self.sources[k - 1]) for t, k in enumerate(picks) if k > 0][: self.max_layers]
        steps: list[FlowStep] = []
        for t, source in used:
            layer = t % self.num_layers
            previous = steps[-1] if steps else None
            if previous is None:
                continues = layer == 0
            else:
                continues = (source, layer) == (previous.source, previous.layer + 1)
            if continues:
                scale = 1.0
            elif self.scale is None:
                scale = float(self.config.scale)
            else:
                low, high = self.scale
                scale = round(low + float(x[self.slots + t]) * (high - low), 6)
            steps.append(FlowStep(source, layer, scale))
        return tuple(steps)

    def encode(self, flow: tuple[FlowStep, ...] | None) -> np.ndarray:
        """Genes that decode to ``flow`` where it follows the slots (step i at a slot after step i-1's,
        offering its layer); a flow that does not, or None, maps to the identity flow of the first
        source."""
        x = np.zeros(len(self.genes))
        if self.scale is not None:
            low, high = self.scale
            x[self.slots :] = 0.5 if high == low else np.clip((1.0 - low) / (high - low), 0.0, 1.0)
        if not flow:
            return self.encode(self.identity_flow(self.sources[0]))
        choices = len(self.sources) + 1
        t = 0
        for step in flow:
            while t < self.slots and t % self.num_layers != step.layer:
                t += 1
            if t >= self.slots or step.source not in self.sources:
                return self.encode(self.identity_flow(self.sources[0]))
            x[t] = (self.sources.index(step.source) + 1.5) / choices
            if self.scale is not None:
                low, high = self.scale
                x[self.slots + t] = 0.5 if high == low else (step.scale - low) / (high - low)
            t += 1
        return np.clip(x, 0.0, 1.0)

    def identity_flow(self, source: str) -> tuple[FlowStep, ...]:
        return tuple(FlowStep(source, i, 1.0) for i in range(self.num_layers))

    def identity(self, source: str, what: str) -> np.ndarray:
        """The genes of ``source``'s layers in order, once; refused where max_layers cuts them."""
        if self.max_layers < self.num_layers:
            raise EvomergeError(
                f"search space cannot reproduce {what}: search_space.data_flow.max_layers "
                f"{self.max_layers} is below the {self.num_layers} layers of one model"
            )
        return self.encode(self.identity_flow(source))

    def layout(self) -> str:
        scale = "" if self.scale is None else f" + {self.slots} scale genes"
        return (
            f"data flow: {self.config.repeats} x {self.num_layers} slots over {', '.join(self.sources)} "
            f"(at most {self.max_layers} layers){scale}"
        )
