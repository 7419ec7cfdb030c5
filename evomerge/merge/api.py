"""``merge_state_dicts``: mergekit's in-memory merge call, on evomerge's Merger.

Same call shape as ``mergekit.merge_methods.api.merge_state_dicts``, so one can replace the other:

    merge_state_dicts({"base": b, "a": a, "b": c}, "ties", base="base",
                      parameters={"weight": [0.6, 0.4], "density": {"a": 0.5, "b": 0.7}})

Per-input parameters may be sequences in input order (without the base, except linear's ``weight``,
which mergekit gives every input), mappings keyed by model id, or scalars. The random masks of
dare_*/della* come from torch's global generator in mergekit's order (or ``generator``), so after the
same ``torch.manual_seed`` the result equals mergekit's. Arithmetic is float32 (or ``dtype``);
results have the inputs' dtype (or ``out_dtype``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.base import MergeMethod, get_method
from evomerge.merge.merger import Merger

StateDict = Mapping[str, torch.Tensor]
StateDictLike = StateDict | torch.nn.Module


def merge_state_dicts(
    models: Mapping[Hashable, StateDictLike] | Sequence[StateDictLike],
    method: str | MergeMethod,
    *,
    parameters: Mapping[str, Any] | None = None,
    base: Hashable | None = None,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    batch_options: Any = None,  # mergekit's packing limits: accepted for compatibility, not needed here
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts (or modules) with a registered method; returns name -> tensor."""
    m = get_method(method) if isinstance(method, str) else method
    items = list(models.items()) if isinstance(models, Mapping) else list(enumerate(models))
    if not items:
        raise EvomergeError(f"merge method {m.name!r} needs at least one model")
    ids = [key for key, _ in items]
    if len(set(ids)) != len(ids):
        raise EvomergeError(f"merge method {m.name!r}: duplicate model ids {ids}")
    if base is not None and base not in ids:
        raise EvomergeError(f"merge method {m.name!r}: base {base!r} is not one of the models {ids}")
    sds = {key: (model.state_dict() if isinstance(model, torch.nn.Module) else model) for key, model in items}
    names = _common_names(m, ids, sds, strict)
    _check_tensors(m, ids, sds, names)

    if base is None and m.base == "required":
        raise EvomergeError(f"merge method {m.name!r} needs a base model: pass base=<one of {ids}>")
    experts = [key for key in ids if key != base]
    m.check_count(len(experts))
    params = _parameters(m, dict(parameters or {}), ids, base, experts)

    view = {key: {n: sds[key][n] for n in names} for key in ids}
    merger = Merger(
        view[base] if base is not None else None,
        {key: view[key] for key in experts},
        dtype=dtype or torch.float32,
        seed=generator,
    )
    merger.fuse = False  # one merge: compiling the fused kernels would cost more than they save
    with torch.no_grad():
        merged = merger.merge(m.name, params)
    result = {}
    for name in names:
        t = merged[name]
        if t.is_floating_point():
            want = out_dtype or _promoted(sds[key][name] for key in ids)
            result[name] = t.to(want)
        else:
            result[name] = t.clone()
    return result


def _common_names(m: MergeMethod, ids: list[Any], sds: dict[Any, StateDict], strict: bool) -> list[str]:
    keys = {key: set(sd) for key, sd in sds.items()}
    union = set().union(*keys.values())
    if strict and any(k != union for k in keys.values()):
        missing = {key: sorted(union - k)[:5] for key, k in keys.items() if k != union}
        raise EvomergeError(f"merge method {m.name!r}: models lack tensors the others have: {missing}")
    return [n for n in sds[ids[0]] if all(n in k for k in keys.values())]


def _check_tensors(m: MergeMethod, ids: list[Any], sds: dict[Any, StateDict], names: list[str]) -> None:
    first = ids[0]
    for name in names:
        t0 = sds[first][name]
        for key in ids[1:]:
            t = sds[key][name]
            if t.shape != t0.shape:
                raise EvomergeError(
                    f"merge method {m.name!r}: tensor {name!r} has shape {tuple(t.shape)} in model {key!r} "
                    f"but {tuple(t0.shape)} in model {first!r}"
                )
            if not t0.is_floating_point() and not torch.equal(t, t0):
                raise EvomergeError(
                    f"merge method {m.name!r}: non-floating tensor {name!r} differs between models "
                    f"{first!r} and {key!r}; resolve it before merging"
                )


def _parameters(
    m: MergeMethod, parameters: dict[str, Any], ids: list[Any], base: Any, experts: list[Any]
) -> dict[str, Any]:
    """mergekit's per-input parameter forms, translated to the Merger's per-expert ones."""
    out: dict[str, Any] = {}
    for name, value in parameters.items():
        p = m.param(name) if not (m.base == "input" and name == "weight") else None
        if p is not None and p.scope == "model" and isinstance(value, Mapping):
            value = {key: value[key] for key in experts if key in value} | {
                key: v for key, v in value.items() if key not in ids
            }
        out[name] = value
    if m.base == "input" and "weight" in parameters:
        # linear: the weight belongs to every input, the base included (mergekit's INPUT scope)
        weight = parameters["weight"]
        if isinstance(weight, Mapping):
            missing = [key for key in ids if key not in weight]
            if missing:
                raise EvomergeError(
                    f"merge method {m.name!r} parameter 'weight': no value for model(s) {missing}"
                )
            per = [weight[key] for key in ids]
        elif isinstance(weight, (list, tuple)):
            if len(weight) != len(ids):
                raise EvomergeError(
                    f"merge method {m.name!r} parameter 'weight': {len(weight)} values given, "
                    f"expected one per model ({len(ids)})"
                )
            per = list(weight)
        else:
            per = [weight] * len(ids)
        out["weight"] = [w for key, w in zip(ids, per, strict=True) if key != base]
        if base is not None:
            out["base_weight"] = per[ids.index(base)]
    return out


def _promoted(tensors: Any) -> torch.dtype:
    dtype = None
    for t in tensors:
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype
