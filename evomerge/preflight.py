"""Checks that run before anything slow starts (zoo build, Ray, model loading).

Everything a run needs that can be read without loading weights is checked here: fitness task names,
model references (local folders with a config.json, GGUF files, ``<prefix>:<name>`` names such as zoo
models, hub ids), that the experts' shapes match the base, layer groups against the model's depth, and
that the run folder can be written and has room for the run's store and best model. Each problem is one
``EvomergeError`` line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError, unknown

# Bytes the store takes per stored evaluation (genome, recipe, per-item responses, SQLite overhead), a
# generous figure: the demo's store holds about 4 KiB per candidate.
STORE_BYTES_PER_EVALUATION = 64 * 1024
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def check_run(config: RunConfig, out: str | Path, new: bool = True) -> None:
    """Every check that needs no weights, cheapest first. ``new``: the run folder must not hold a run."""
    from evomerge.fitness import check_tasks

    check_out(Path(out), estimate_run_bytes(config), new)
    if config.fitness.tasks:
        check_importable(LMEVAL_NEEDS, "lm-eval fitness (fitness.tasks)")
        check_tasks(config.fitness.tasks, [str(p) for p in config.fitness.include])
    refs = {"base": config.models.base, **{f"expert {k}": v for k, v in config.models.experts.items()}}
    if config.models.tokenizer:
        refs["tokenizer"] = config.models.tokenizer
    for role, ref in refs.items():
        check_reference(role, ref)
    depth = model_depth(config.models.base)
    if depth is not None and config.search_space.layer_groups > depth:
        raise EvomergeError(
            f"search_space.layer_groups is {config.search_space.layer_groups} but the base model has "
            f"{depth} decoder layers; use at most {depth} groups"
        )


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


def _local_config(ref: str) -> dict[str, Any] | None:
    """config.json of a local model folder, or of a ``<prefix>:<name>`` model where its prefix knows it
    without building the model."""
    from evomerge.models import REFERENCES, split_reference

    prefixed = split_reference(ref)
    if prefixed is not None:
        prefix, name = prefixed  # an unknown prefix is check_reference's to name
        return REFERENCES.get(prefix).config(name) if prefix in REFERENCES else None
    path = Path(ref).expanduser() / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise EvomergeError(f"model config {str(path)!r} is not valid JSON: {e}") from None
    return None


def model_depth(ref: str) -> int | None:
    """Decoder layers of a model whose config can be read without the network (None otherwise)."""
    cfg = _local_config(ref)
    if cfg is None:
        return None
    depth = cfg.get("num_hidden_layers") or cfg.get("text_config", {}).get("num_hidden_layers")
    return int(depth) if depth else None


def safetensors_elements(path: Path) -> int:
    """Elements in a safetensors file, read from its JSON header alone (never the weights)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(size, 100 * 2**20)))
        if not isinstance(header, dict):
            raise ValueError("its header is not a mapping")
    except (OSError, ValueError) as e:
        raise EvomergeError(f"{str(path)!r} is not a readable safetensors file: {e}") from None
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            n = 1
            for d in entry["shape"]:
                n *= d
            total += n
    return total


def model_bytes(ref: str, dtype: str) -> int | None:
    """A model's bytes in ``dtype`` from its safetensors files or its config (None where unknown)."""
    path = Path(ref).expanduser()
    files = list(path.glob("*.safetensors")) if path.is_dir() else []
    if files:
        return sum(safetensors_elements(f) for f in files) * DTYPE_BYTES[dtype]
    cfg = _local_config(ref)
    if cfg is None:
        return None
    hidden, layers = cfg.get("hidden_size"), cfg.get("num_hidden_layers")
    inter, vocab = cfg.get("intermediate_size"), cfg.get("vocab_size", 32000)
    if not (hidden and layers and inter):
        return None
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    return (layers * per_layer + 2 * vocab * hidden) * DTYPE_BYTES[dtype]


def estimate_run_bytes(config: RunConfig) -> int:
    """What a run writes: its store (every evaluation) and the best model (one model's weights)."""
    a = config.algorithm
    evaluations = a.pop_size * a.generations + 2 * (len(config.models.experts) + 1) + 4 * a.pop_size
    evaluations += config.fitness.calibration.random_merges
    weights = model_bytes(config.models.base, config.models.dtype) or 0
    return evaluations * STORE_BYTES_PER_EVALUATION + weights


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
