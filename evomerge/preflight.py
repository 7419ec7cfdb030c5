"""Checks that run before anything slow starts (zoo build, Ray, model loading).

Everything a run needs that can be read without loading weights is checked here: fitness task names,
model references (local folders with a config.json, GGUF files, ``<prefix>:<name>`` names such as zoo
models, hub ids), that the experts' shapes match the base, layer groups against the model's depth, and
that the run folder can be written and has room for the run's store and best model. Each problem is one
``EvomergeError`` line.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.config import DEPTH, RunConfig
from evomerge.errors import EvomergeError, unknown
from evomerge.plan import (
    DTYPE_BYTES,
    Machine,
    ModelShape,
    Plan,
    check_loadable,
    local_config,
    model_shape,
    plan,
)

# Bytes the store takes per stored evaluation (genome, recipe, per-item responses, SQLite overhead), a
# generous figure: the demo's store holds about 4 KiB per candidate.
STORE_BYTES_PER_EVALUATION = 64 * 1024


def check_run(
    config: RunConfig, out: str | Path, new: bool = True, machine: Machine | None = None
) -> Plan | None:
    """Every check that needs no weights, cheapest first, ending with the memory plan (returned; None
    where the models' sizes cannot be known offline). ``new``: the run folder must not hold a run."""
    from evomerge.fitness import check_tasks

    check_out(Path(out), estimate_run_bytes(config, 0), new)
    if config.fitness.tasks:
        check_importable(LMEVAL_NEEDS, "lm-eval fitness (fitness.tasks)")
        fitness = config.fitness
        check_tasks(
            fitness.tasks,
            [str(p) for p in fitness.include],
            splits=(fitness.search_split, fitness.test_split),
            objectives=[o for o in config.objectives if o.of != DEPTH],
            options=dict(fitness),
        )
    shapes = model_shapes(config)
    depth = model_depth(config.models.base)
    if depth is not None and config.search_space.layer_groups > depth:
        raise EvomergeError(
            f"search_space.layer_groups is {config.search_space.layer_groups} but the base model has "
            f"{depth} decoder layers; use at most {depth} groups"
        )
    base_config = local_config(config.models.base)
    check_compatible(config, base_config)
    if depth is not None:
        from evomerge.algorithms import check_genes
        from evomerge.searchspace import SearchSpace

        space = SearchSpace(config.search_space, list(config.models.experts), depth)
        check_genes(config.algorithm.name, space.n_var, space.layout())
        base_type = (base_config or {}).get("model_type")
        if space.flow is not None and space.flow.scaled and base_type:
            from evomerge.flow import scalable

            scalable(base_type)
    base = shapes["base"]
    if base is not None:  # room for the best model, before whether it fits in memory
        dtype = compute_dtype(config, resolve_device(config))
        check_out(Path(out), estimate_run_bytes(config, base.bytes(dtype)), new)
    return plan_for(config, shapes, machine)


def check_compatible(config: RunConfig, base: dict[str, Any] | None) -> None:
    """What ``ModelSet.check`` refuses when a run starts (``models.check_mergeable``), from the config.json
    files readable here (``base``: the base's)."""
    from evomerge.models import check_mergeable

    if base is None:
        return
    for name, ref in config.models.experts.items():
        cfg = local_config(ref)
        if cfg is not None:
            check_mergeable(name, cfg, base)


# What lm-eval's HF backend imports when a worker first evaluates; lm-eval itself requires none of them.
LMEVAL_NEEDS = ("lm_eval", "accelerate")


def check_importable(modules: tuple[str, ...], needed_for: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(m.replace("_", "-") for m in missing)
        raise EvomergeError(f"{needed_for} needs {names}, which is not installed: pip install {names}")


def check_reference(role: str, ref: str) -> None:
    """A model reference that cannot be resolved, named with its role, before anything is built."""
    from evomerge.models import REFERENCES, looks_local, split_reference

    prefixed = split_reference(ref)
    if prefixed is not None:
        prefix, name = prefixed
        names = REFERENCES.get(prefix).names()
        if name not in names:
            raise unknown(f"{prefix} model", name, names)
        return
    path = Path(ref).expanduser()
    if ref.lower().endswith(".gguf"):
        if not path.is_file():
            raise EvomergeError(f"{role}: GGUF file {ref!r} does not exist")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EvomergeError(f"{role}: model folder {ref!r} has no config.json (not a saved HF model)")
    elif looks_local(ref):
        raise EvomergeError(f"{role}: model folder {ref!r} does not exist")


def model_depth(ref: str) -> int | None:
    """Decoder layers of a model whose config can be read without the network (None otherwise)."""
    cfg = local_config(ref)
    if cfg is None:
        return None
    depth = cfg.get("num_hidden_layers") or cfg.get("text_config", {}).get("num_hidden_layers")
    return int(depth) if depth else None


def estimate_run_bytes(config: RunConfig, weights: int) -> int:
    """What a run writes: its store (every evaluation) and the best model (``weights`` bytes)."""
    a = config.algorithm
    evaluations = a.pop_size * a.generations + 2 * (len(config.models.experts) + 1) + 4 * a.pop_size
    evaluations += config.fitness.calibration.random_merges
    return evaluations * STORE_BYTES_PER_EVALUATION + weights


# --- where the workers run ------------------------------------------------------------------------------


def resolve_device(config: RunConfig) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``: auto is cuda where torch sees a GPU. A cuda device torch does not
    see here is refused, unless the run joins a Ray cluster, whose nodes' GPUs Ray places workers on."""
    import torch

    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = config.device
    if device == "auto":
        return "cuda" if seen else "cpu"
    if device == "cpu" or config.ray.address:
        return device
    if not seen:
        cuda = "CUDA is not built into it" if torch.version.cuda is None else "no GPU is visible"
        raise EvomergeError(
            f"device is {device} but torch {torch.__version__} sees no GPU here ({cuda}); "
            "use device: cpu or auto"
        )
    if ":" in device and int(device.split(":")[1]) >= seen:
        raise EvomergeError(f"device is {device} but torch sees {seen} GPU(s): cuda:0 to cuda:{seen - 1}")
    return device


def compute_dtype(config: RunConfig, device: str) -> str:
    """models.dtype, or its default for the device: bfloat16 on cuda, float32 on cpu."""
    return config.models.dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def gpus_per_worker(config: RunConfig, device: str) -> float:
    """GPUs each worker asks Ray for: none on cpu or on a fixed ``cuda:N`` (every worker uses that GPU),
    else gpus_per_worker (default 1)."""
    if device == "cuda":
        return config.gpus_per_worker or 1.0
    if device.startswith("cuda:") and config.gpus_per_worker:
        raise EvomergeError(
            f"device {device} puts every worker on that GPU; gpus_per_worker lets Ray choose: "
            "use device: cuda with gpus_per_worker, or remove gpus_per_worker"
        )
    return 0.0


def model_shapes(config: RunConfig) -> dict[str, ModelShape | None]:
    """Each model reference checked (``check_reference``) and, for the base and the experts, its shape
    from safetensors headers or config.json (None where neither can be read offline); a quantized
    checkpoint is refused."""
    refs = {"base": config.models.base, **{f"expert {k}": v for k, v in config.models.experts.items()}}
    if config.models.tokenizer:
        check_reference("tokenizer", config.models.tokenizer)
    shapes = {}
    for role, ref in refs.items():
        check_reference(role, ref)
        shape = shapes[role] = model_shape(ref)
        if shape is not None:
            check_loadable(role, ref, shape)
    return shapes


def plan_run(config: RunConfig, machine: Machine | None = None, device: str | None = None) -> Plan | None:
    """The run's memory plan on ``machine`` (None: this one), from config.json and safetensors headers
    alone; refuses a quantized checkpoint and, in one line with the numbers, models that fit no
    placement. None when the base's size cannot be known offline (a hub id not in the local cache).
    ``device`` (with ``machine``) plans for another machine's device than this one's."""
    return plan_for(config, model_shapes(config), machine, device)


def plan_for(
    config: RunConfig,
    shapes: dict[str, ModelShape | None],
    machine: Machine | None = None,
    device: str | None = None,
) -> Plan | None:
    """:func:`plan_run` with the models' shapes already read."""
    device = device or resolve_device(config)
    dtype = compute_dtype(config, device)
    base = shapes["base"]
    if base is None:
        return None
    g = gpus_per_worker(config, device)
    if machine is None:
        machine = Machine.here(device)
        if device.startswith("cuda") and config.ray.address:
            return None  # the cluster's GPUs: each worker checks its own (Worker.check_memory)
    if device == "cuda" and g > len(machine.gpus):
        raise EvomergeError(
            f"gpus_per_worker is {g:g} but {machine.described} has {len(machine.gpus)} GPU(s); "
            f"use at most {len(machine.gpus)}"
        )
    return plan(
        base,
        dtype,
        len(config.models.experts),
        machine,
        gpus_per_worker=g,
        threads=config.threads_per_worker,
        workers=None if config.workers == "auto" else config.workers,
        placement=config.placement,
        batch_size=config.fitness.batch_size,
        max_length=config.fitness.max_length,
        sketches=uses_sketches(config.search_space.methods),
        cache_models=subspace_cache(config.search_space.methods, len(config.models.experts))
        + held_models(config) * DTYPE_BYTES[dtype] / 4,
    )


def held_models(config: RunConfig) -> int:
    """Models whose decoder layers a worker holds besides its own for the data flow: each source the
    slots offer other than the merge (``evomerge.flow.hold_layers``; counted as whole models)."""
    from evomerge.recipe import MERGE
    from evomerge.searchspace import flow_sources

    return len([s for s in flow_sources(config.search_space, list(config.models.experts)) if s != MERGE])


def uses_sketches(methods: Sequence[str]) -> bool:
    """Whether any of ``methods`` builds order-statistics sketches (ties, breadcrumbs,
    breadcrumbs_ties, sce): the sort behind them is a worker's largest one-time transient."""
    from evomerge.merge import sce
    from evomerge.merge.base import get_method
    from evomerge.merge.sparsify import prepare_magnitude

    return any(get_method(m).prepare in (prepare_magnitude, sce.prepare) for m in methods)


def subspace_cache(methods: Sequence[str], experts: int) -> float:
    """Float32 model sizes of the SVD factors the subspace methods among ``methods`` cache where a
    worker merges: sum of a + b K (each group may draw any of them, so every one's may be held)."""
    from evomerge.merge.base import get_method

    return sum(a + b * experts for a, b in (get_method(m).cache_models for m in dict.fromkeys(methods)))


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out(out: Path, needed: int, new: bool = True) -> None:
    """The run folder: not a file, not already a run (``new``), writable, with ``needed`` bytes free."""
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"--out {str(out)!r} is a file, not a folder")
    if new and (out / "store.sqlite").exists():
        raise EvomergeError(
            f"run folder {str(out)!r} already holds a run; continue it with `evomerge resume {out}` "
            "or choose another --out"
        )
    parent = _existing_parent(out)
    if not parent.is_dir():
        raise EvomergeError(f"--out {str(out)!r} cannot be created: {str(parent)!r} is not a folder")
    try:  # access() is not enough: read-only mounts and root's bypass of permission bits
        fd, probe = tempfile.mkstemp(prefix=".evomerge-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EvomergeError(
            f"run folder {str(out)!r} is not writable ({str(parent)!r}: {e.strerror})"
        ) from None
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise EvomergeError(
            f"run folder {str(out)!r} needs about {_mib(needed)} (store and best model) but "
            f"{str(parent)!r} has {_mib(free)} free; free some space or choose another --out"
        )


def _mib(n: int) -> str:
    """Integer arithmetic: a config may ask for more bytes than a float holds."""
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 1024} KiB"


def disk_full(e: BaseException) -> bool:
    """Whether an error says the disk (or the SQLite database's limit) is full."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "database or disk is full" in str(e)
