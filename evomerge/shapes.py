"""The sizes of models, known before any weight is read: a model's :class:`ModelShape` from its
safetensors headers (local folders) or, where there are none, from its config.json (the model is built on
torch's ``meta`` device, which allocates nothing). The memory plan (:mod:`evomerge.plan`) is made of them.

Needs torch alone (transformers only to size a model from its config), as the plan does.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.hf import safetensors_header

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# safetensors dtypes that hold float weights evomerge can merge; anything else (I8, U8, F8_*) is a
# quantized checkpoint.
FLOAT_STORED = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
QUANTIZED_STORED = {"I8", "U8", "I4", "U4"}
DEFAULT_CONTEXT = 2048
# The keyed dare kernels' kept-l1 table (evomerge.merge.fused.KeptTable): built for tensors of at least
# KEPT_TABLE_MIN elements, KEPT_TABLE_BYTES per expert and tensor (2^16 float32 bucket masses and 257
# float64 partial sums), held beside the task vectors for the whole search.
KEPT_TABLE_MIN = 1 << 18
KEPT_TABLE_BYTES = (1 << 16) * 4 + 257 * 8


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
    tabled: int = 0  # floating-point tensors of KEPT_TABLE_MIN elements or more (a kept-l1 table each)

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
    elements = largest = other = tabled = 0
    stored: set[str] = set()
    for f in files:
        for entry in safetensors_header(f).values():
            n = math.prod(entry["shape"])
            dtype = entry["dtype"]
            if dtype in FLOAT_STORED:
                elements += n
                largest = max(largest, n)
                tabled += n >= KEPT_TABLE_MIN
            else:  # integer buffers, or a quantized checkpoint's packed weights (check_loadable)
                other += n * _stored_bytes(dtype)
            if dtype in FLOAT_STORED or dtype.startswith("F8") or dtype in QUANTIZED_STORED:
                stored.add(dtype)
    return ModelShape(
        elements, largest, other, frozenset(stored), source="safetensors headers", tabled=tabled, **_dims(cfg)
    )


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
    elements = largest = other = tabled = 0
    for p in model.parameters():  # tied parameters are listed once
        elements += p.numel()
        largest = max(largest, p.numel())
        tabled += p.numel() >= KEPT_TABLE_MIN
    named = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name in model.state_dict():  # persistent buffers: what a checkpoint stores besides parameters
        if name not in named:
            b = model.get_buffer(name)
            if b.is_floating_point():
                elements += b.numel()
            else:
                other += b.numel() * b.element_size()
    return ModelShape(
        elements, largest, other, frozenset(), source="config.json", tabled=tabled, **_dims(cfg)
    )


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
