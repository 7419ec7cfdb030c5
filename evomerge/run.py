"""Explore a run folder from a notebook: ``run = evomerge.load_run("runs/demo")``.

The store is opened read-only and read once, so a run still in progress can be loaded (call
``load_run`` again for newer results); nothing in the folder is written.
"""

from __future__ import annotations

from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from evomerge import objectives
from evomerge.errors import EvomergeError
from evomerge.objectives import ObjectiveConfig
from evomerge.runfolder import RunFolder
from evomerge.store import Candidate, Kind, Status

if TYPE_CHECKING:
    from evomerge.config import RunConfig

_HEAD_COLUMNS = ("id", "kind", "generation", "label", "split", "status")
_TAIL_COLUMNS = (
    "genome",
    "recipe",
    "recipe_key",
    "metrics",
    "n_items",
    "stopped",
    "n_tokens",
    "wall_s",
    "worker",
    "error",
)


def _plain(v: Any) -> Any:
    """Enum values (status, kind) as the strings the store holds."""
    return v.value if isinstance(v, Enum) else v


def load_run(path: str | Path) -> Run:
    """Load the run folder ``path`` (one that holds store.sqlite)."""
    return Run(path)


def _read_store(path: Path) -> tuple[dict[str, Any], list[Candidate]]:
    """The meta table and every candidate, read in one read-only transaction (WAL lets a writer go on)."""
    store = RunFolder(path).open_store(readonly=True)
    try:
        return store.snapshot()
    finally:
        store.close()


class Run:
    """One run folder, read from its store.

    ``candidates`` has one row per stored candidate (index: candidate id): kind (search, test or
    reference), generation, label, split, status, one column per objective, ``test_<objective>``, genome,
    recipe, recipe_key, metrics (every value the fitness returned), n_items, stopped (why an adaptive
    test stopped: precise, max_items, exhausted, raced; None otherwise), n_tokens, wall_s (seconds
    the evaluation took), worker and error. ``test_<objective>`` is set on successful search rows whose
    weights were also scored on the test split (the run does this for its Pareto front) and is NaN on
    every other row. A run with a data flow has ``depth`` too (the decoder layers of each candidate's
    model). ``objectives`` are the run's objective configs (name, of, direction); ``config`` is
    the RunConfig, or the stored dict when this evomerge cannot parse it; ``models`` the resolved model
    paths the run merged (base, experts, tokenizer, dtype).
    """

    def __init__(self, path: str | Path, snapshot: tuple[dict[str, Any], list[Candidate]] | None = None):
        self.path = Path(path)
        # ``snapshot``: the store's (meta, candidates) as a process already holding it read them
        meta, self._records = snapshot if snapshot is not None else _read_store(self.path)
        self._meta = meta
        if "config" not in meta:
            raise EvomergeError(f"run {str(self.path)!r} has not recorded its config yet")
        raw = self._raw = meta["config"]
        self.objectives = [ObjectiveConfig.model_validate(o) for o in raw["objectives"]]
        self.models: dict[str, Any] | None = meta.get("models")
        self.candidates = self._frame(raw["fitness"]["test_split"])

    @cached_property
    def config(self) -> RunConfig | dict[str, Any]:
        """The RunConfig, parsed when first asked (it loads the merge methods' declarations), or the
        stored dict when this evomerge cannot parse it."""
        from evomerge.config import parse_config

        try:
            return parse_config(self._raw)
        except EvomergeError:  # another evomerge version, or a fitness function not importable here
            return self._raw

    @property
    def meta(self) -> dict[str, Any]:
        """The run's meta as stored (:class:`evomerge.runfolder.RunMeta`'s fields), config included."""
        return dict(self._meta)

    @property
    def genes(self) -> list[str] | None:
        """The genome's gene names in order (``group/expert/parameter``): what each genome column is."""
        return self._meta.get("genes")

    def _frame(self, test_split: str) -> pd.DataFrame:
        names = [o.name for o in self.objectives]
        tested = {
            c.recipe_key: c.objectives
            for c in self._records
            if c.split == test_split and c.status == Status.OK
        }
        rows = []
        for c in self._records:
            values = c.objectives or {}
            test = tested.get(c.recipe_key, {}) if c.kind == Kind.SEARCH and c.status == Status.OK else {}
            rows.append(
                [
                    *(_plain(getattr(c, col)) for col in _HEAD_COLUMNS),
                    *(values.get(n, np.nan) for n in names),
                    *(test.get(n, np.nan) for n in names),
                    *(getattr(c, col) for col in _TAIL_COLUMNS),
                ]
            )
        columns = [*_HEAD_COLUMNS, *names, *(f"test_{n}" for n in names), *_TAIL_COLUMNS]
        df = pd.DataFrame(rows, columns=columns).set_index("id")
        flow = self._raw.get("search_space", {}).get("data_flow") is not None
        if flow and "depth" not in df:  # the decoder layers of each candidate (unless an objective's name)
            depth = [len(r["flow"]) if isinstance(r, dict) and r.get("flow") else pd.NA for r in df.recipe]
            df.insert(len(_HEAD_COLUMNS) - 1, "depth", pd.array(depth, dtype="Int64"))
        return df.astype({"generation": "Int64"})

    # --- views -------------------------------------------------------------------------------------------
    def _searched(self) -> pd.DataFrame:
        """Successful search candidates."""
        df = self.candidates
        return df[(df.kind == Kind.SEARCH) & (df.status == Status.OK)].astype({"generation": int})

    def _front(self) -> list[Candidate]:
        return objectives.front_of(self._records, self.objectives)

    def pareto_front(self) -> pd.DataFrame:
        """The non-dominated successful search candidates (one per distinct recipe), best first by the
        first objective; the same front the run wrote to front.csv."""
        return self.candidates.loc[[c.id for c in self._front()]]

    @property
    def best_id(self) -> int:
        """The candidate the run saved as best_model/ (:func:`evomerge.objectives.best_of`): the front
        member with the best mean of the objectives, earliest on ties; with estimated objectives, once
        the run has re-scored its front on the whole search split, the best on measured values among
        the front and the calibration models (whose id it then is)."""
        best = objectives.best_of(self._records, self.objectives, self._raw["fitness"]["search_split"])
        if best is None:
            raise EvomergeError(f"run {str(self.path)!r} has no successful search candidate yet")
        return best[0].id

    @property
    def history(self) -> pd.DataFrame:
        """One row per generation: candidates evaluated, failed and stopped by racing, items per candidate
        (mean), best and mean of each objective, the best so far, and the evaluation seconds (summed
        over workers) of the generation and so far.
        Genomes whose recipe the run had already scored are not re-evaluated, so are not counted."""
        df = self.candidates[self.candidates.kind == Kind.SEARCH]
        aggregations: dict[str, tuple[str, str]] = {
            "evaluated": ("status", "size"),
            "failed": ("failed", "sum"),
            "items_per_candidate": ("n_items", "mean"),
            "raced": ("raced", "sum"),
        }
        for o in self.objectives:
            aggregations[f"best_{o.name}"] = (o.name, o.direction)
            aggregations[f"mean_{o.name}"] = (o.name, "mean")
        aggregations["wall_s"] = ("wall_s", "sum")
        h = (
            df.assign(failed=df.status != Status.OK, raced=df.stopped == "raced")
            .groupby("generation")
            .agg(**aggregations)
        )
        for o in self.objectives:
            h[f"cum_best_{o.name}"] = getattr(h[f"best_{o.name}"], f"cum{o.direction}")().ffill()
        h["cum_wall_s"] = h["wall_s"].cumsum()
        return h.reset_index()

    def plot_front(self, ax: Any = None) -> Any:
        """Plot the successful search candidates and return the matplotlib Figure. One objective: its value
        per generation with the running best; two: the objectives against each other coloured by
        generation, with the Pareto front circled; three or more: a scatter matrix of every pair of
        objectives drawn that way (front circled in each panel), each objective per generation with its
        running best on the diagonal, in a new figure (``ax`` is refused). Without a display matplotlib
        falls back to the Agg backend."""
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        if len(self.objectives) > 2:
            if ax is not None:
                raise EvomergeError(
                    f"plot_front draws {len(self.objectives)} objectives as a scatter matrix in a new "
                    "figure; call it without `ax` (one or two objectives take an `ax`)"
                )
            return self._plot_matrix()
        if ax is None:
            _, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
        fig = ax.figure
        searched = self._searched()
        if len(self.objectives) == 1:
            self._plot_per_generation(ax, searched, self.objectives[0])
        else:
            x, y = self.objectives
            points = self._plot_pair(ax, searched, self.pareto_front(), x, y)
            colorbar = fig.colorbar(points, ax=ax, label="generation")
            colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{self.path.name}: search candidates")
        ax.legend()
        return fig

    def _plot_per_generation(self, ax: Any, searched: pd.DataFrame, o: ObjectiveConfig) -> None:
        ax.scatter(searched.generation, searched[o.name], c=searched.generation, cmap="viridis", alpha=0.7)
        self._label_depth(ax, self.pareto_front(), "generation", o.name)
        history = self.history
        ax.plot(history.generation, history[f"cum_best_{o.name}"], color="C3", label="best so far")
        ax.set_xlabel("generation")
        ax.set_ylabel(f"{o.name} ({o.direction})")

    @staticmethod
    def _plot_pair(
        ax: Any, searched: pd.DataFrame, front: pd.DataFrame, x: ObjectiveConfig, y: ObjectiveConfig
    ) -> Any:
        points = ax.scatter(
            searched[x.name], searched[y.name], c=searched.generation, cmap="viridis", alpha=0.7
        )
        ax.scatter(
            front[x.name], front[y.name], s=150, facecolors="none", edgecolors="C3", label="Pareto front"
        )
        Run._label_depth(ax, front, x.name, y.name)
        ax.set_xlabel(f"{x.name} ({x.direction})")
        ax.set_ylabel(f"{y.name} ({y.direction})")
        return points

    @staticmethod
    def _label_depth(ax: Any, points: pd.DataFrame, x: str, y: str) -> None:
        """Each point's depth (its decoder layers) beside it, in a run with a data flow."""
        if "depth" not in points:
            return
        for depth, px, py in zip(points.depth, points[x], points[y], strict=True):
            if not pd.isna(depth):
                ax.annotate(f"{depth}L", (px, py), xytext=(6, 4), textcoords="offset points", fontsize=7)

    def _plot_matrix(self) -> Any:
        """Row i, column j: objective j (x) against objective i (y); the diagonal: objective i per
        generation with its running best. One colour bar (generation) for the whole figure."""
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        n = len(self.objectives)
        fig, axes = plt.subplots(n, n, figsize=(3.2 * n + 1.2, 3.0 * n), layout="constrained", squeeze=False)
        searched, front = self._searched(), self.pareto_front()
        points = None
        for i, y in enumerate(self.objectives):
            for j, x in enumerate(self.objectives):
                ax = axes[i, j]
                if i == j:
                    self._plot_per_generation(ax, searched, y)
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                else:
                    points = self._plot_pair(ax, searched, front, x, y)
        axes[0, 0].legend(fontsize="small")
        axes[0, 1].legend(fontsize="small")
        colorbar = fig.colorbar(points, ax=axes, label="generation", shrink=0.6)
        colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(f"{self.path.name}: search candidates, every pair of objectives")
        return fig

    # --- answers -------------------------------------------------------------------------------------------
    def answers(self, candidate_id: int, task: str | None = None, limit: int | None = None) -> pd.DataFrame:
        """What candidate ``candidate_id`` wrote for each item of the run's generative tasks: task, item,
        prompt, target, answer and score (the item's value of the task's metric), ``limit`` items per
        task. Empty for a run without generative tasks."""
        from evomerge.answers import answers

        self._known(candidate_id)
        record = next(c for c in self._records if c.id == candidate_id)
        fitness = self._raw.get("fitness", {})
        return answers(record, fitness.get("include", ()), None if task is None else [task], limit)

    @property
    def has_answers(self) -> bool:
        """Whether any candidate has stored answers (the run has a generative task)."""
        return any(c.outputs for c in self._records)

    def _known(self, candidate_id: int) -> None:
        if candidate_id not in self.candidates.index:
            ids = self.candidates.index
            known = f"its candidates: {ids.min()}..{ids.max()}" if len(ids) else "it has no candidates yet"
            raise EvomergeError(f"run {str(self.path)!r} has no candidate {candidate_id}; {known}")

    # --- models --------------------------------------------------------------------------------------------
    def load_model(self, candidate_id: int, device: str = "cpu") -> tuple[Any, Any]:
        """Re-merge candidate ``candidate_id``'s recipe from the run's models, as its worker did, and return
        the Hugging Face model (eval mode) and tokenizer. ``device``: where to load and merge (cpu, cuda,
        cuda:N, or auto to spread the model over the visible GPUs); the masks of dare_*/della* are the
        same on every device, so the weights equal the worker's up to the device's rounding."""
        self._known(candidate_id)
        if self.models is None:
            raise EvomergeError(f"run {str(self.path)!r} does not record its model paths")
        recipe = self.candidates.at[candidate_id, "recipe"]
        return remerge(recipe, self.models, self._meta.get("keyed_stream"), self.path, device)

    def __repr__(self) -> str:
        kinds = self.candidates.kind.value_counts()
        counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
        objectives = ", ".join(f"{o.name} ({o.direction})" for o in self.objectives)
        searched = self._searched()
        best = ", ".join(f"{o.name}={getattr(searched[o.name], o.direction)():.4g}" for o in self.objectives)
        return (
            f"Run({str(self.path)!r}): {len(self.candidates)} candidates ({counts}); "
            f"objectives: {objectives}; best on the search split: {best if len(searched) else 'none yet'}"
        )


def remerge(
    recipe: dict[str, Any],
    models: dict[str, Any],
    keyed_stream: int | None,
    run_dir: Path,
    device: str = "cpu",
) -> tuple[Any, Any]:
    """A stored recipe merged from a run's ``models`` as its worker merged it: the model (eval mode) and
    tokenizer (``Run.load_model``, ``evomerge export --format hf``); a data flow's model is an ordinary
    one with ``num_hidden_layers`` its depth, each layer its own copy."""
    from evomerge.merge.merger import check_masks_reproducible
    from evomerge.models import ModelSet
    from evomerge.recipe import Recipe
    from evomerge.workers import search_merger

    parsed = Recipe.from_dict(recipe)
    check_masks_reproducible(keyed_stream, [g.method for g in parsed.groups], run_dir)
    model_set = ModelSet(**models)
    model = model_set.load_model(device=device)
    merger = search_merger(model, model_set)
    merger.apply(parsed, out=model)
    if parsed.flow is not None:  # the data flow's layers, copied into an ordinary model
        from evomerge.flow import flow_sources, standalone

        sources = flow_sources(model, merger, parsed.flow, list(model_set.experts))
        model = standalone(model, sources, parsed.flow)
    return model.eval(), model_set.load_tokenizer()
