"""What every module that loads or saves Hugging Face models shares: the dtypes a config may name, and
transformers' progress bars switched off."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
