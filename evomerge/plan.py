"""The memory plan: what each worker holds on its device and in host memory under each placement,
which placement a run uses and how many workers fit, known before any weight is read.

A model's size comes from its safetensors headers (local folders) or, where there are none, from its
config.json (the model is built on torch's ``meta`` device, which allocates nothing). Placements:

- ``device``: the base, the K task vectors and the one output model on the worker's device:
  (K + 2) model sizes there;
- ``streamed``: the task vectors in pinned host memory, copied to the device tensor by tensor during a
  merge: base and output (2 model sizes) plus two K-stacks of the largest tensor on the device, K model
  sizes of host memory;
- ``host``: everything in host memory, for ``device: cpu``.

Besides the weights a worker holds the order-statistics sketches of the TIES family in host memory
(1/85 of a float32 model per expert), the subspace methods' SVD factors where it merges (up to a + b K
float32 model sizes per method, ``MergeMethod.cache_models``), and on its merging device the larger of two peaks: building
those sketches once (sorting the largest tensor), or a merge's scratch (chunks of float32) plus the
fitness's activations, estimated for ``fitness.batch_size`` sequences of ``fitness.max_length`` tokens
(default: the model's context, at most 2048).

This module needs torch alone (transformers only to size a model from its config), so the GPU
benchmark can compare a measured peak with the plan's prediction where pydantic is not installed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from evomerge.errors import EvomergeError
from evomerge.hf import safetensors_header

Placement = Literal["device", "streamed", "host"]
PLACEMENTS: tuple[Placement, ...] = ("device", "streamed", "host")

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# safetensors dtypes that hold float weights evomerge can merge; anything else (I8, U8, F8_*) is a
# quantized checkpoint.
FLOAT_STORED = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
QUANTIZED_STORED = {"I8", "U8", "I4", "U4"}
SKETCH_FRACTION = 1 / 85  # the magnitude sketches per expert, of a float32 model
# A merge works through a tensor in chunks of this many elements (evomerge.merge's GPU and CPU loops).
GPU_CHUNK = 1 << 24
CPU_CHUNK = 1 << 18
# Planning margins, not measurements: a CUDA context and the allocator's slack per worker on its GPU,
# and a worker process's libraries (torch, transformers, lm-eval) in host memory.
DEVICE_MARGIN = 1 << 30
HOST_PROCESS = 1 << 30
DEFAULT_CONTEXT = 2048


@dataclass(frozen=True)
class ModelShape:
    """What the plan knows of a model without its weights."""

    elements: int  # floating-point elements, tensors the model ties counted once
    largest: int  # elements of the largest floating-point tensor
    other_bytes: int  # non-floating tensors (buffers), as stored
    stored: frozenset[str]  # the safetensors dtypes of the floating tensors (empty: sized from config)
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int  # key/value width per layer (kv heads x head dim)
    context: int
    source: str  # "safetensors headers" or "config.json"
    quantization: str | None = None  # config.json's quantization method, for a quantized checkpoint

    def bytes(self, dtype: str) -> int:
        return self.elements * DTYPE_BYTES[dtype] + self.other_bytes

    def activations(self, batch: int, tokens: int, dtype: str) -> int:
        """A forward pass over ``batch`` x ``tokens``: float32 logits and their log-softmax, the
        key/value cache, and one layer's widest intermediates."""
        b = DTYPE_BYTES[dtype]
        per_token = (
            2 * 4 * self.vocab + 2 * self.layers * self.kv_dim * b + 4 * (self.intermediate + self.hidden) * b
        )
        return batch * tokens * per_token


@dataclass(frozen=True)
class Memory:
    """Bytes one worker holds on its device and in host memory."""

    device: int
    host: int


def worker_memory(
    placement: str,
    *,
    model_bytes: int,
    largest_bytes: int,
    experts: int,
    sketch_bytes: int = 0,
    activation_bytes: int = 0,
    scratch_bytes: int = 0,
    transient_bytes: int = 0,
    cache_bytes: int = 0,
) -> Memory:
    """One worker's memory under ``placement`` for a model of ``model_bytes`` (compute dtype) whose
    largest tensor has ``largest_bytes`` and ``experts`` task vectors: the weights where the placement
    puts them, the sketches in host memory, and on the merging device the larger of the one-time
    ``transient_bytes`` (building the sketches) and a merge's ``scratch_bytes`` plus the fitness's
    ``activation_bytes``, plus the subspace methods' ``cache_bytes`` where the merges run. Margins
    (CUDA context, libraries) are not included: this is the arithmetic of what evomerge allocates."""
    k = experts
    work = max(transient_bytes, scratch_bytes + activation_bytes) + cache_bytes
    if placement == "device":
        return Memory((k + 2) * model_bytes + work, sketch_bytes)
    if placement == "streamed":
        return Memory(2 * model_bytes + 2 * k * largest_bytes + work, k * model_bytes + sketch_bytes)
    if placement == "host":
        return Memory(0, (k + 2) * model_bytes + sketch_bytes + work)
    raise EvomergeError(f"unknown placement {placement!r}; allowed: {', '.join(PLACEMENTS)}")


def merge_work(largest: int, experts: int, cuda: bool, sketches: bool) -> tuple[int, int]:
    """(scratch, transient) bytes of merges whose largest tensor has ``largest`` elements: about K + 10
    float32 chunks of it while a tensor merges (GPU_CHUNK elements on a GPU, CPU_CHUNK on a CPU), and,
    for the TIES family's sketches, sorting the largest tensor once (torch.sort on a GPU needs about
    28 bytes per element; numpy on a CPU 4)."""
    chunk = GPU_CHUNK if cuda else CPU_CHUNK
    scratch = (experts + 10) * min(largest, chunk) * 4
    transient = (28 if cuda else 4) * largest if sketches else 0
    return scratch, transient


# --- sizes of models ------------------------------------------------------------------------------------


def _dims(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ModelShape fields config.json gives: sizes for the activations, and a quantization."""
    text = cfg.get("text_config") or {}
    quant = cfg.get("quantization_config")
    quantization = None
    if quant:
        quantization = quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"

    def get(key: str, default: int = 0) -> int:
        value = cfg.get(key, text.get(key))
        return int(value) if value else default

    hidden, heads = get("hidden_size"), get("num_attention_heads", 1)
    head_dim = get("head_dim") or (hidden // heads if heads else 0)
    return {
        "layers": get("num_hidden_layers"),
        "hidden": hidden,
        "intermediate": get("intermediate_size", 4 * hidden),
        "vocab": get("vocab_size", 32000),
        "kv_dim": get("num_key_value_heads", heads) * head_dim,
        "context": get("max_position_embeddings", DEFAULT_CONTEXT),
        "quantization": quantization,
    }


def shape_from_headers(files: Sequence[Path], cfg: dict[str, Any]) -> ModelShape:
    elements = largest = other = 0
    stored: set[str] = set()
    for f in files:
        for entry in safetensors_header(f).values():
            n = math.prod(entry["shape"])
            dtype = entry["dtype"]
            if dtype in FLOAT_STORED:
                elements += n
                largest = max(largest, n)
            else:  # integer buffers, or a quantized checkpoint's packed weights (check_loadable)
                other += n * _stored_bytes(dtype)
            if dtype in FLOAT_STORED or dtype.startswith("F8") or dtype in QUANTIZED_STORED:
                stored.add(dtype)
    return ModelShape(elements, largest, other, frozenset(stored), source="safetensors headers", **_dims(cfg))


def _stored_bytes(dtype: str) -> int:
    found = re.search(r"(\d+)", dtype)
    return max(1, int(found[1]) // 8) if found else 1


def shape_from_config(cfg: dict[str, Any]) -> ModelShape:
    """Parameter shapes from config.json: the model built on the ``meta`` device (no memory)."""
    return _shape_from_config(json.dumps(cfg, sort_keys=True))


@functools.lru_cache(maxsize=32)
def _shape_from_config(text: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads(text)
    data = dict(cfg)
    model_type = data.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **data)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (KeyError, ValueError, TypeError) as e:
        raise EvomergeError(
            f"cannot size a {model_type!r} model from its config: {str(e).splitlines()[0][:200]}"
        ) from None
    elements = largest = other = 0
    for p in model.parameters():  # tied parameters are listed once
        elements += p.numel()
        largest = max(largest, p.numel())
    named = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name in model.state_dict():  # persistent buffers: what a checkpoint stores besides parameters
        if name not in named:
            b = model.get_buffer(name)
            if b.is_floating_point():
                elements += b.numel()
            else:
                other += b.numel() * b.element_size()
    return ModelShape(elements, largest, other, frozenset(), source="config.json", **_dims(cfg))


def model_shape(ref: str) -> ModelShape | None:
    """The shape of a local folder, a ``<prefix>:<name>`` model whose prefix knows its config, or a hub
    model found in the local Hugging Face cache; None where neither can be read offline."""
    path = Path(ref).expanduser()
    if path.is_dir():
        cfg = local_config(ref) or {}
        files = sorted(path.glob("*.safetensors"))
        if files:
            return shape_from_headers(files, cfg)
        return shape_from_config(cfg) if cfg else None
    cfg = local_config(ref) or _cached_hub_config(ref)
    return shape_from_config(cfg) if cfg else None


def local_config(ref: str) -> dict[str, Any] | None:
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


def _cached_hub_config(ref: str) -> dict[str, Any] | None:
    if ref.lower().endswith(".gguf") or ref.count("/") > 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(ref, "config.json")
    except Exception:  # not a valid repo id, no hub library: unknown
        return None
    if isinstance(found, str):
        try:
            return json.loads(Path(found).read_text())
        except (OSError, ValueError):
            return None
    return None


def check_loadable(role: str, ref: str, shape: ModelShape) -> None:
    """Refuse a checkpoint whose weights are not floats (quantized): it cannot be loaded in a float
    compute dtype and merged."""
    if shape.quantization:
        raise EvomergeError(
            f"{role} {ref!r} is a {shape.quantization} checkpoint; evomerge merges float weights (float32, "
            "bfloat16, float16): use the unquantized model"
        )
    odd = sorted(shape.stored - set(FLOAT_STORED))
    if odd:
        raise EvomergeError(
            f"{role} {ref!r} stores weights as {', '.join(odd)}, which cannot be loaded as float32, "
            "bfloat16 or float16: use an unquantized checkpoint"
        )


# --- the machine ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """What a plan is made for: the device kind, each GPU's memory, host memory and CPU cores."""

    device: Literal["cpu", "cuda"]
    gpus: tuple[int, ...] = ()
    host: int = 0
    cpus: int = 1
    described: str = "this machine"

    @classmethod
    def here(
        cls,
        device: str,
        gpus: int | None = None,
        gpu_memory: int | None = None,
        host_memory: int | None = None,
        cpus: int | None = None,
    ) -> Machine:
        """This machine, or one described by the overrides (``evomerge plan --gpus 4 --gpu-memory ...``)."""
        kind: Literal["cpu", "cuda"] = "cuda" if device.startswith("cuda") else "cpu"
        overridden = any(v is not None for v in (gpus, gpu_memory, host_memory, cpus))
        memories: tuple[int, ...] = ()
        if kind == "cuda":
            seen = _cuda_memories()
            if device.startswith("cuda:") and seen:
                index = int(device.split(":")[1])
                seen = seen[index : index + 1]
            n = gpus if gpus is not None else len(seen)
            per = gpu_memory if gpu_memory is not None else (min(seen) if seen else 0)
            memories = (per,) * n
        return cls(
            kind,
            memories,
            host_memory if host_memory is not None else host_available(),
            cpus if cpus is not None else (os.cpu_count() or 1),
            "the machine described" if overridden else "this machine",
        )


def _cuda_memories() -> tuple[int, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    return tuple(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def host_available() -> int:
    """Host memory available to new processes (MemAvailable), else the total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20}
_UNITS |= {"g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str, what: str) -> int:
    """``80GiB``, ``80GB``, ``512MiB``, ``1.5TiB`` or a number of bytes."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = found[2].lower() if found else None
    if found is None or unit not in _UNITS or float(found[1]) <= 0:
        raise EvomergeError(f"{what} {text!r} is not a size; write e.g. 80GiB, 80GB or 512MiB")
    return int(float(found[1]) * _UNITS[unit])


def size(n: float) -> str:
    """Bytes in GiB, MiB or KiB, whichever reads best (a count past any float, from an absurd setting
    such as batch_size 10^400, as its power of ten)."""
    if isinstance(n, int) and n >= 2**1000:
        return f"about 10^{len(str(n)) - 1} bytes"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"


def params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


# --- the plan -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One placement on the machine: each worker's memory and how many workers fit."""

    placement: Placement
    memory: Memory
    fit: int  # workers that fit (0: none)
    limit: str  # what limits the count


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    dtype: str
    experts: int
    machine: Machine
    gpus_per_worker: float
    options: tuple[Option, ...]
    chosen: Option
    workers: int
    activations: int

    @property
    def model_bytes(self) -> int:
        return self.shape.bytes(self.dtype)

    def lines(self) -> list[str]:
        """The plan as a small table (what ``evomerge plan`` and the start of a run print)."""
        s, m = self.shape, self.machine
        if m.device == "cpu":
            where = "cpu"
        elif m.gpus:
            where = f"{len(m.gpus)} GPU(s) of {size(m.gpus[0])}"
        else:
            where = "no GPU"
        experts = f"{self.experts} expert" + ("s" if self.experts != 1 else "")
        out = [
            f"model     {params(s.elements)} parameters ({s.source}), {size(self.model_bytes)} in {self.dtype}; "
            f"{experts}; fitness activations {size(self.activations)} per worker",
            f"machine   {where}, {size(m.host)} host memory available, {m.cpus} CPU cores ({m.described})",
            f"{'placement':9s} {'device':>10s} {'host':>10s}   workers (per worker, margins included)",
        ]
        for o in self.options:
            device = "-" if o.placement == "host" else size(o.memory.device + DEVICE_MARGIN)
            fits = f"{o.fit} fit ({o.limit})" if o.fit else f"none fit ({o.limit})"
            out.append(f"{o.placement:9s} {device:>10s} {size(o.memory.host + HOST_PROCESS):>10s}   {fits}")
        gpus = (
            f", {self.gpus_per_worker:g} GPU(s) each" if m.device == "cuda" and self.gpus_per_worker else ""
        )
        out.append(f"chosen    {self.chosen.placement}, {self.workers} worker(s){gpus}")
        return out


def plan(
    shape: ModelShape,
    dtype: str,
    experts: int,
    machine: Machine,
    *,
    gpus_per_worker: float = 1.0,
    threads: int = 1,
    workers: int | None = None,
    placement: str = "auto",
    batch_size: int = 8,
    max_length: int | None = None,
    sketches: bool = True,  # the search uses a method with magnitude sketches (the TIES family)
    cache_models: float = 0.0,  # float32 model sizes of the subspace methods' SVD factors
) -> Plan:
    """Each placement's memory per worker on ``machine``, and the one the run uses: the fastest that
    fits ``workers`` (None: the most workers that fit, at least one). Raises one line with the numbers
    when nothing fits."""
    model_bytes = shape.bytes(dtype)
    largest = shape.largest * DTYPE_BYTES[dtype]
    tokens = min(max_length or DEFAULT_CONTEXT, shape.context or DEFAULT_CONTEXT)
    activations = shape.activations(batch_size, tokens, dtype)
    sketch = int(experts * shape.elements * 4 * SKETCH_FRACTION) if sketches else 0
    scratch, transient = merge_work(shape.largest, experts, machine.device == "cuda", sketches)
    cache = int(cache_models * shape.elements * 4)
    candidates: tuple[Placement, ...] = ("device", "streamed") if machine.device == "cuda" else ("host",)
    if placement != "auto":
        if placement not in PLACEMENTS:
            raise EvomergeError(f"unknown placement {placement!r}; allowed: auto, {', '.join(PLACEMENTS)}")
        if placement not in candidates:
            allowed = ", ".join(candidates)
            raise EvomergeError(
                f"placement {placement!r} needs another device; on {machine.device}: {allowed}"
            )
        candidates = (placement,)
    options = []
    for p in candidates:
        memory = worker_memory(
            p,
            model_bytes=model_bytes,
            largest_bytes=largest,
            experts=experts,
            sketch_bytes=sketch,
            activation_bytes=activations,
            scratch_bytes=scratch,
            transient_bytes=transient,
            cache_bytes=cache,
        )
        options.append(Option(p, memory, *_fit(memory, machine, gpus_per_worker, threads)))
    wanted = workers or 1
    chosen = next((o for o in options if o.fit >= wanted), None)
    if chosen is None:
        raise EvomergeError(_refusal(options, machine, workers, model_bytes, dtype))
    return Plan(
        shape,
        dtype,
        experts,
        machine,
        gpus_per_worker,
        tuple(options),
        chosen,
        workers or chosen.fit,
        activations,
    )


def _fit(memory: Memory, machine: Machine, gpus_per_worker: float, threads: int) -> tuple[int, str]:
    """How many workers of ``memory`` fit on the machine, and what limits them."""
    host_need = memory.host + HOST_PROCESS
    by_host = machine.host // host_need
    counts = {"host memory": by_host}
    if machine.device == "cuda":
        need = memory.device + DEVICE_MARGIN
        g = gpus_per_worker
        if g <= 1:
            slots = int(1 / g + 1e-9)
            counts["GPU memory"] = sum(slots for m in machine.gpus if slots * need <= m)
            counts["GPUs"] = len(machine.gpus) * slots
        else:
            per_worker = int(g)
            groups = len(machine.gpus) // per_worker
            ok = machine.gpus and need <= per_worker * min(machine.gpus)
            counts["GPU memory"] = groups if ok else 0
            counts["GPUs"] = groups
    else:
        counts["CPU cores"] = max(1, machine.cpus // threads)
    limit = min(counts, key=lambda k: counts[k])
    return int(counts[limit]), limit


def _refusal(
    options: Sequence[Option], machine: Machine, workers: int | None, model_bytes: int, dtype: str
) -> str:
    parts = []
    for o in options:
        if machine.device == "cuda":
            per = min(machine.gpus) if machine.gpus else 0
            need = f"{size(o.memory.device + DEVICE_MARGIN)} per worker on a GPU of {size(per)}"
            if o.memory.host:
                need += f" and {size(o.memory.host + HOST_PROCESS)} of host memory"
        else:
            need = f"{size(o.memory.host + HOST_PROCESS)} of host memory per worker"
        parts.append(f"{o.placement} needs {need} ({o.fit} fit, limited by {o.limit})")
    have = f"{size(machine.host)} of host memory available"
    if machine.device == "cuda":
        have = f"{len(machine.gpus)} GPU(s), " + have
    head = (
        f"{workers} worker(s) do not fit"
        if workers and any(o.fit for o in options)
        else "the models do not fit"
    )
    return (
        f"{head} on {machine.described} ({have}; the model is {size(model_bytes)} in {dtype}): "
        + "; ".join(parts)
        + ("; set workers: auto or fewer workers" if workers and any(o.fit for o in options) else "")
    )
