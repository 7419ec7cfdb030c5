"""What every module that loads or saves Hugging Face models shares: the dtypes a config may name,
transformers' progress bars switched off, and a safetensors file's header read without its weights."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

DTYPES = ("float32", "bfloat16", "float16")  # the weight dtypes a run may load and merge in


def torch_dtype(name: str) -> Any:
    """torch's dtype of that name (one of ``DTYPES``); torch is imported here, not with this module,
    which the memory plan and config checks read without it."""
    import torch

    return getattr(torch, name)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' per-shard progress bars off for the duration (they would print per candidate)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (never its weights)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100 * 2**20:
                raise ValueError(f"its header length {size} is not plausible")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("its header is not a mapping")
    except (OSError, ValueError) as e:
        raise EvomergeError(f"{str(path)!r} is not a readable safetensors file: {e}") from None
    header.pop("__metadata__", None)
    return header
