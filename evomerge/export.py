"""Export a candidate: its recipe as a mergekit YAML, so that ``mergekit-yaml`` reproduces evomerge's
merge, or (``--format hf``, any recipe) the merged model itself as a Hugging Face folder.

A recipe's layer groups become mergekit parameter filters: each per-model or shared parameter is a list
of ``{filter: "layers.<i>.", value: v}`` entries, one per decoder layer, ending with the ``other``
group's value without a filter (embeddings, final norm, lm_head). Every parameter is written explicitly,
defaults included, so the file does not depend on either tool's defaults.

mergekit 0.1.5 applies one ``merge_method`` per configuration, so a recipe whose groups use different
methods cannot be written as one file; ``to_mergekit`` refuses it with the methods it found, and a
recipe that uses one of evomerge's own methods (the subspace methods: tsv, iso_c, ...) with that method,
and one with a ``lines`` modifier naming its group.

A recipe with a data flow (``evomerge.flow``) is two merges, written as the documents of one
``mergekit-multi`` file (``to_mergekit_stages``): first the parameter-space merge of the recipe's groups,
named ``evomerge-merge`` (the configuration above, so the same refusals apply), then a ``passthrough``
merge that stacks the flow's layers as ``slices``, one per maximal run of consecutive layers of one source
with one cumulative scale C. A run with C != 1 multiplies its residual-output projections
(``self_attn.o_proj``, ``mlp.down_proj``) by 1/C through passthrough's ``scale`` parameter, filtered on
those names. The embeddings, final norm and lm_head are the parameter-space merge's, as in the worker's
flow model: mergekit takes them from the first and the last slice's model, so the passthrough begins and
ends with a slice of that merge, empty (``layer_range: [0, 0]``) unless the flow begins or ends there.
mergekit writes the base's config with ``num_hidden_layers`` set to the depth and every other field as
it was, so where the base is a local folder a flow that its per-layer lists (``layer_types``,
``no_rope_layers``, ...) would contradict is refused (another depth, or other entries in other places),
as are a scale on a model type without known residual-output projections and a layer out of range.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError
from evomerge.flow import (
    MERGE,
    PER_LAYER,
    RESIDUAL_OUTPUTS,
    check_flow,
    factors,
    flow_config,
    residual_outputs,
)
from evomerge.merge import get_method
from evomerge.recipe import FlowStep, Recipe

MERGE_STAGE = "evomerge-merge"  # the parameter-space merge's name in a mergekit-multi file


def _value(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    return float(v)


def _setting(per_group: list[tuple[tuple[int, int] | None, Any]]) -> Any:
    """One parameter's mergekit setting: a scalar when every group agrees, else filtered values."""
    values = [v for _, v in per_group]
    if all(v == values[0] for v in values):
        return values[0]
    entries: list[dict[str, Any]] = []
    fallback = None
    for layers, v in per_group:
        if layers is None:
            fallback = v
            continue
        entries += [{"filter": f"layers.{i}.", "value": v} for i in range(*layers)]
    if fallback is not None:
        entries.append({"value": fallback})
    return entries


def to_mergekit(
    recipe: Recipe | Mapping[str, Any],
    base: str,
    experts: Mapping[str, str],
    *,
    dtype: str = "float32",
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """The mergekit configuration (a dict ready for YAML) that merges ``experts`` onto ``base`` as
    ``recipe`` says. ``base``/``experts`` are what mergekit should load: local paths or hub ids."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe)
    if recipe.flow is not None:
        raise EvomergeError(
            "the recipe has a data flow: mergekit makes it in two merges (the parameter-space merge, then "
            "a passthrough of the flow's layers), written by to_mergekit_stages for mergekit-multi"
        )
    for g in recipe.groups:
        if not get_method(g.method).mergekit:
            raise EvomergeError(
                f"merge method {g.method!r} (group {g.name}) is evomerge's own: mergekit cannot reproduce "
                "it; write the merged model instead with `evomerge export --format hf`"
            )
        if g.lines is not None:
            raise EvomergeError(
                f"the lines modifier (group {g.name}) is evomerge's own: mergekit cannot reproduce it; "
                "write the merged model instead with `evomerge export --format hf`"
            )
    methods = sorted({g.method for g in recipe.groups})
    if len(methods) > 1:
        groups = ", ".join(f"{g.name}: {g.method}" for g in recipe.groups)
        raise EvomergeError(
            f"recipe uses several merge methods ({groups}); a mergekit configuration has one "
            "merge_method, so only single-method recipes can be exported"
        )
    method = get_method(methods[0])
    names = list(experts)
    resolved = [(g.layers, method.resolve(g.parameters, names)) for g in recipe.groups]
    per_model: dict[str, dict[str, Any]] = {e: {} for e in names}
    shared: dict[str, Any] = {}
    base_params: dict[str, Any] = {}
    for p in method.params:
        if p.scope == "model":
            for i, e in enumerate(names):
                per_model[e][p.name] = _setting([(layers, _value(r[p.name][i])) for layers, r in resolved])
        elif method.base == "input" and p.name == "base_weight":
            # linear: the base is one more input, weighted like the others (mergekit's `weight`)
            base_params["weight"] = _setting([(layers, _value(r[p.name])) for layers, r in resolved])
        else:
            shared[p.name] = _setting([(layers, _value(r[p.name])) for layers, r in resolved])
    models: list[dict[str, Any]] = [{"model": experts[e], "parameters": per_model[e]} for e in names]
    config: dict[str, Any] = {"merge_method": method.name}
    if method.base == "input":
        models.insert(0, {"model": base, "parameters": base_params})
    else:
        config["base_model"] = base
    config["models"] = models
    if shared:
        config["parameters"] = shared
    config["dtype"] = dtype
    config["tokenizer_source"] = tokenizer or base
    return config


def to_mergekit_stages(
    recipe: Recipe | Mapping[str, Any],
    base: str,
    experts: Mapping[str, str],
    *,
    dtype: str = "float32",
    tokenizer: str | None = None,
) -> list[dict[str, Any]]:
    """The mergekit-multi documents that make ``recipe``: for a recipe without a data flow, the one
    configuration of ``to_mergekit``; with one, the parameter-space merge (named ``MERGE_STAGE``) and
    the passthrough that stacks the flow's layers (unnamed: mergekit-multi writes it to ``--out-path``)."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe)
    if recipe.flow is None:
        return [to_mergekit(recipe, base, experts, dtype=dtype, tokenizer=tokenizer)]
    flow = recipe.flow
    paths = {MERGE: MERGE_STAGE, "base": base, **experts}
    model_type = _check_base_config(base, paths, flow)
    merge = {
        "name": MERGE_STAGE,
        **to_mergekit(Recipe(recipe.groups), base, experts, dtype=dtype, tokenizer=tokenizer),
    }
    # without the base's config (a hub id), the names every known type shares
    projections = RESIDUAL_OUTPUTS.get(model_type or "llama", RESIDUAL_OUTPUTS["llama"])
    runs: list[list[Any]] = []  # [source, first layer, end layer, factor]
    for step, factor in zip(flow, factors(flow), strict=True):
        last = runs[-1] if runs else None
        if last is not None and last[0] == step.source and last[2] == step.layer and last[3] == factor:
            last[2] += 1
        else:
            runs.append([step.source, step.layer, step.layer + 1, factor])
    slices = []
    for source, start, stop, factor in runs:
        entry: dict[str, Any] = {"model": paths[source], "layer_range": [start, stop]}
        if factor != 1.0:
            entry["parameters"] = {"scale": [{"filter": name, "value": factor} for name in projections]}
        slices.append({"sources": [entry]})
    empty = {"sources": [{"model": MERGE_STAGE, "layer_range": [0, 0]}]}
    if runs[0][0] != MERGE:
        slices.insert(0, empty)
    if runs[-1][0] != MERGE:
        slices.append(copy.deepcopy(empty))
    stack = {
        "merge_method": "passthrough",
        "base_model": MERGE_STAGE,
        "slices": slices,
        "dtype": dtype,
        "tokenizer_source": tokenizer or base,
    }
    return [merge, stack]


def _check_base_config(base: str, sources: Mapping[str, str], flow: tuple[FlowStep, ...]) -> str | None:
    """Refuse a flow with an unknown source or a bad scale and, where ``base`` is a local folder, what
    mergekit would write wrongly for it: layers out of range, scales on a model type without known
    residual-output projections, per-layer config lists the flow contradicts (mergekit copies them as
    they are). The base's model type, None for a hub id."""
    path = Path(base) / "config.json"
    if not path.is_file():
        check_flow(flow, dict.fromkeys(sources, sys.maxsize))
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path.parent)
    kept = config.get_text_config(decoder=True)
    check_flow(flow, dict.fromkeys(sources, kept.num_hidden_layers))
    residual_outputs(config.model_type, flow)
    wanted = flow_config(config, flow).get_text_config(decoder=True)
    for key in PER_LAYER:
        old, new = getattr(kept, key, None), getattr(wanted, key, None)
        if old is not None and list(old) != list(new):
            raise EvomergeError(
                f"the base's config lists {key} per layer ({len(old)} layers) and the data flow needs "
                f"others ({len(flow)} layers); mergekit 0.1.5 copies them as they are, so its model would "
                "be wrong or not load: write the model instead with `evomerge export --format hf`"
            )
    return config.model_type


def export_candidate(
    run_dir: str | Path, candidate_id: int, out: str | Path | None = None, fmt: str = "mergekit"
) -> Path:
    """Write candidate ``candidate_id`` of a run as a mergekit YAML (default
    ``RUN_DIR/exports/candidate-<id>.mergekit.yaml``; a recipe with a data flow as a mergekit-multi file,
    ``candidate-<id>.mergekit-multi.yaml``) or, ``fmt="hf"``, as the merged model (default
    ``RUN_DIR/exports/candidate-<id>/``), and return its path; existing files are kept."""
    run_dir = Path(run_dir)
    if fmt == "hf":
        return export_model(run_dir, candidate_id, out)
    if fmt != "mergekit":
        raise EvomergeError(f"unknown export format {fmt!r}; allowed: mergekit, hf")
    recipe, models, _ = _candidate(run_dir, candidate_id)
    docs = to_mergekit_stages(
        recipe,
        models["base"],
        mergekit_experts(models["base"], models["experts"]),
        dtype=models.get("dtype", "float32"),
        tokenizer="union" if models.get("vocab") == "union" else models.get("tokenizer"),
    )
    kind = "mergekit" if len(docs) == 1 else "mergekit-multi"
    path = _target(out, run_dir / "exports" / f"candidate-{candidate_id}.{kind}.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def mergekit_experts(base: str, experts: Mapping[str, str]) -> dict[str, str]:
    """The experts as mergekit names them: a PEFT adapter as ``<base>+<adapter>`` (mergekit applies it
    to the base with PEFT's merge_and_unload, as evomerge does), a model as its path or hub id."""
    from evomerge.adapters import is_adapter

    return {name: f"{base}+{ref}" if is_adapter(ref) else ref for name, ref in experts.items()}


def export_model(run_dir: str | Path, candidate_id: int, out: str | Path | None = None) -> Path:
    """Re-merge candidate ``candidate_id`` on the CPU as its worker did (``Run.load_model``) and save it
    with its tokenizer as a Hugging Face folder (safetensors), written whole or not at all."""
    import shutil
    import tempfile

    from evomerge.run import remerge

    run_dir = Path(run_dir)
    recipe, models, keyed_stream = _candidate(run_dir, candidate_id)
    path = _target(out, run_dir / "exports" / f"candidate-{candidate_id}")
    model, tokenizer = remerge(recipe, models, keyed_stream, run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _target(out: str | Path | None, default: Path) -> Path:
    path = Path(out) if out is not None else default
    if path.exists():
        raise EvomergeError(f"{str(path)!r} already exists; choose another --out")
    return path


def _candidate(run_dir: Path, candidate_id: int) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """(recipe, model paths, keyed stream version) of a stored candidate; one line for a missing
    candidate or model paths."""
    from evomerge.runfolder import RunFolder

    folder = RunFolder(run_dir)
    store = folder.open_store(readonly=True)
    try:
        meta = folder.meta(store)
        models, keyed_stream = meta.models, meta.keyed_stream
        try:
            candidate = store.get(candidate_id)
        except KeyError:
            ids = [c.id for c in store.candidates()]
            raise EvomergeError(
                f"run {str(run_dir)!r} has no candidate {candidate_id}; its candidates: "
                f"{min(ids)}..{max(ids)}"
                if ids
                else f"run {str(run_dir)!r} has no candidates yet"
            ) from None
    finally:
        store.close()
    if models is None:
        raise EvomergeError(
            f"run {str(run_dir)!r} does not record its model paths (made by an older evomerge)"
        )
    return candidate.recipe, models, keyed_stream
