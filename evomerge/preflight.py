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
from typing import TYPE_CHECKING, Any, Literal

from evomerge.config import DEPTH, RunConfig
from evomerge.errors import EvomergeError, unknown
from evomerge.methods import declaration
from evomerge.plan import (
    DTYPE_BYTES,
    Machine,
    ModelShape,
    Plan,
    check_loadable,
    local_config,
    model_shape,
    parse_bytes,
    plan,
)

if TYPE_CHECKING:
    from evomerge.models import ModelSet

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
        check_bank_items(config)
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
    """What ``ModelSet.check`` refuses when a run starts, with its messages: where every model is a local
    folder, that check itself (model types, shapes, adapters' bases, tokenizers); else what the
    config.json files readable here show (``base``: the base's; ``models.check_mergeable``)."""
    from evomerge.models import check_mergeable

    models = local_models(config)
    if models is not None:
        models.check()
    elif base is not None:
        for name, ref in config.models.experts.items():
            cfg = local_config(ref)
            if cfg is not None:
                check_mergeable(name, cfg, base)


def local_models(config: RunConfig) -> ModelSet | None:
    """The run's ModelSet where every model (and the tokenizer) is a local folder, else None: a hub id
    or a ``<prefix>:<name>`` reference is read only when the run loads it."""
    from evomerge.models import ModelSet

    m = config.models
    if all(_folder(ref) for ref in (m.base, *m.experts.values(), *([m.tokenizer] if m.tokenizer else []))):
        return ModelSet(m.base, dict(m.experts), m.tokenizer, vocab=m.vocab)
    return None


def _folder(ref: str) -> bool:
    """A plain local folder (not a ``<prefix>:<name>`` reference, which may build its model)."""
    from evomerge.models import split_reference

    return split_reference(ref) is None and Path(ref).expanduser().is_dir()


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
        from evomerge.adapters import is_adapter

        if not (path / "config.json").is_file() and not (role.startswith("expert") and is_adapter(path)):
            raise EvomergeError(
                f"{role}: model folder {ref!r} has neither a config.json (a saved HF model) nor an "
                "adapter_config.json (a PEFT adapter)"
                if role.startswith("expert")
                else f"{role}: model folder {ref!r} has no config.json (not a saved HF model)"
            )
    elif looks_local(ref):
        raise EvomergeError(f"{role}: model folder {ref!r} does not exist")


def model_depth(ref: str) -> int | None:
    """Decoder layers of a model whose config can be read without the network (None otherwise)."""
    cfg = local_config(ref)
    if cfg is None:
        return None
    depth = cfg.get("num_hidden_layers") or cfg.get("text_config", {}).get("num_hidden_layers")
    return int(depth) if depth else None


def check_bank_items(config: RunConfig) -> None:
    """An item bank file (``estimation.bank: PATH``) whose items the run's tasks do not have is refused
    with how many match, by check and run alike, before anything is stored (the file itself, its tasks
    and split were checked with the config). A file that does not exist yet is the one `evomerge
    calibrate --out` is about to write."""
    path = config.estimation.bank
    if not isinstance(path, Path) or not path.exists() or not any(o.estimator for o in config.objectives):
        return
    from evomerge.bank import ItemBank
    from evomerge.fitness.tasks import load_task

    fitness = config.fitness
    include = [str(p) for p in fitness.include]
    n_items = {t: len(list(load_task(t, fitness.search_split, include).eval_docs)) for t in fitness.tasks}
    ItemBank.load(path).check_covers(n_items, fitness.search_split, f"item bank {str(path)!r}")


def estimate_run_bytes(config: RunConfig, weights: int) -> int:
    """What a run writes: its store (every evaluation) and the best model (``weights`` bytes)."""
    a = config.algorithm
    evaluations = a.pop_size * a.generations + 2 * (len(config.models.experts) + 1) + 4 * a.pop_size
    if any(o.estimator for o in config.objectives):
        from evomerge.calibration import random_merge_count

        evaluations += random_merge_count(config)
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
    else gpus_per_worker (default 1; the memory plan, where there is one, chooses the fewest that fit)."""
    if device == "cuda":
        return config.gpus_per_worker or 1.0
    if device.startswith("cuda:") and config.gpus_per_worker:
        raise EvomergeError(
            f"device {device} puts every worker on that GPU; gpus_per_worker lets Ray choose: "
            "use device: cuda with gpus_per_worker, or remove gpus_per_worker"
        )
    return 0.0


# workers unset on a CPU: the count runs had before the plan chose it (a GPU's: as many as fit).
CPU_WORKERS = 2


def workers_wanted(config: RunConfig, device: str) -> int | Literal["auto"]:
    """``workers`` as set; unset: auto on a GPU (as many as the memory plan fits), CPU_WORKERS on a CPU."""
    if config.workers is not None:
        return config.workers
    return "auto" if device.startswith("cuda") else CPU_WORKERS


def model_shapes(config: RunConfig) -> dict[str, ModelShape | None]:
    """Each model reference checked (``check_reference``) and, for the base and the experts, its shape
    from safetensors headers or config.json (None where neither can be read offline); a quantized
    checkpoint is refused."""
    refs = {"base": config.models.base, **{f"expert {k}": v for k, v in config.models.experts.items()}}
    if config.models.tokenizer:
        check_reference("tokenizer", config.models.tokenizer)
    shapes = {}
    from evomerge.adapters import is_adapter

    for role, ref in refs.items():
        check_reference(role, ref)
        if role != "base" and _folder(ref) and is_adapter(ref):  # the base's shape, once applied
            shapes[role] = None
            continue
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
    fitness = config.fitness
    workers = workers_wanted(config, device)
    return plan(
        base,
        dtype,
        len(config.models.experts),
        machine,
        gpus_per_worker=None if device == "cuda" and config.gpus_per_worker is None else g,
        threads=config.threads_per_worker,
        workers=None if workers == "auto" else workers,
        placement=config.placement,
        batch_size=fitness.batch_size,
        max_length=fitness.max_length,
        python=fitness.function is not None,
        fitness_memory=parse_bytes(fitness.memory, "fitness.memory") if fitness.memory else None,
        sketches=uses_sketches(config.search_space.methods),
        kept_tables=uses_kept_tables(config.search_space.methods),
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
    """Whether any of ``methods`` declares that it builds order-statistics sketches (ties, breadcrumbs,
    breadcrumbs_ties, sce): the sort behind them is a worker's largest one-time transient."""
    return any(declaration(m).sketches for m in methods)


def uses_kept_tables(methods: Sequence[str]) -> bool:
    """Whether any of ``methods`` keeps a kept-l1 table per large tensor and expert (dare_ties,
    dare_linear under the search's keyed masks)."""
    return any(declaration(m).kept_tables for m in methods)


def subspace_cache(methods: Sequence[str], experts: int) -> float:
    """Float32 model sizes of the SVD factors the subspace methods among ``methods`` cache where a
    worker merges: sum of a + b K (each group may draw any of them, so every one's may be held)."""
    return sum(a + b * experts for a, b in (declaration(m).cache_models for m in dict.fromkeys(methods)))


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


# --- the compatibility report (`evomerge check`) --------------------------------------------------------


def _rope(cfg: dict[str, Any]) -> str:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    return f"{kind} {theta:g}" if isinstance(theta, (int, float)) else str(kind)


def _facts(cfg: dict[str, Any]) -> dict[str, Any]:
    text = cfg.get("text_config") or cfg
    return {
        "type": cfg.get("model_type"),
        "hidden": text.get("hidden_size"),
        "layers": text.get("num_hidden_layers"),
        "rows": text.get("vocab_size"),
        "rope": _rope(text),
        "tied": cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True)),
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
    }


def compatibility(config: RunConfig) -> list[str]:
    """Each expert against the base (architecture, hidden size, layers, embedding rows, tokenizer, rope,
    tied embeddings, stored dtype) and what evomerge does with each difference, as a table. Tokenizers
    are compared where every model is a local folder (``local_models``), else shown as ?."""
    import pandas as pd

    from evomerge.vocab import check_vocab

    m = config.models
    models = local_models(config)
    dtype = compute_dtype(config, resolve_device(config))
    base_cfg = local_config(m.base)
    if base_cfg is None:
        return [
            "compatibility: the base's config.json cannot be read offline; the run checks it when it loads"
        ]
    base = _facts(base_cfg)
    base_vocab = models.vocab_of(m.base) if models is not None else None
    shown = {k: "?" if v is None else str(v) for k, v in base.items()}
    rows = [{"model": "base", "kind": "model", **shown, "tokenizer": "", "evomerge": ""}]
    for name, ref in m.experts.items():
        adapter = models.adapter(ref) if models is not None else None
        cfg = base_cfg if adapter is not None else local_config(ref)
        row: dict[str, Any] = {"model": name, "kind": adapter.describe() if adapter else "model"}
        facts = _facts(cfg) if cfg is not None else {}
        for key, want in base.items():
            have = facts.get(key)
            row[key] = "?" if cfg is None else "same" if have == want else str(have)
        will = []
        if adapter is not None:
            will.append("apply to the base in memory (PEFT merge_and_unload)")
            row["rows"] = str(adapter.embedding_rows() or "same")
        row["tokenizer"] = "?"
        if models is not None and base_vocab is not None:
            mine = models.vocab_of(ref)
            added = check_vocab(name, base_vocab, mine, m.vocab)
            if mine.tokens is None:
                row["tokenizer"] = "none (the base's)"
            else:
                row["tokenizer"] = f"+{len(added)} tokens" if added else "same ids"
            if added:
                verb = "append" if m.vocab == "union" else "leave out"
                will.append(f"{verb} its {len(added)} added tokens (models.vocab: {m.vocab})")
            elif mine.rows != base_vocab.rows:
                will.append(f"match its {mine.rows} rows to the base's {base_vocab.rows} by token")
        if row.get("rope") not in ("same", "?"):
            will.append("keep the base's rope settings")
        if row.get("tied") not in ("same", "?"):
            will.append("keep the base's " + ("tied" if base["tied"] else "separate") + " output embedding")
        if row.get("dtype") not in ("same", "?", "None"):
            will.append(f"load in {dtype}")
        row["evomerge"] = "; ".join(will) or ("merge as it is" if cfg is not None else "checked when loaded")
        rows.append(row)
    table = pd.DataFrame(rows).rename(columns={"evomerge": "evomerge will"})
    return [
        "compatibility with the base",
        *(line.rstrip() for line in table.to_string(index=False).splitlines()),
    ]
