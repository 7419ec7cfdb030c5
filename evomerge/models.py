"""ModelSet: the base, the experts and the tokenizer of one merge problem.

A reference is a local HF folder, a hub id (passed through to transformers), or ``zoo:<name>`` for the
tiny zoo that evomerge builds itself (``zoo:base``, ``zoo:addition``, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evomerge.errors import EvomergeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "head_dim",
)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' per-shard progress bars off for the duration (they would print per candidate)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_hf(folder: str | Path, model, tokenizer) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` as a Hugging Face folder, without progress bars."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return folder


def _looks_local(ref: str) -> bool:
    """Paths, unlike hub ids ("gpt2", "org/name"), start with . / ~, have several parts, or start in an
    existing folder ("runs/x" where runs/ exists here is a typo'd local path, not a hub id)."""
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        return True
    return ref.count("/") == 1 and Path(ref.split("/")[0]).is_dir()


@dataclass
class ModelSet:
    base: str
    experts: dict[str, str]
    tokenizer: str | None = None
    dtype: str = "float32"
    zoo_dir: Path | None = None
    _resolved: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def resolve(self, ref: str) -> str:
        """A local folder path or a hub id for ``ref``; local folders must exist."""
        if ref in self._resolved:
            return self._resolved[ref]
        if ref.startswith("zoo:"):
            from evomerge import zoo

            name = ref.removeprefix("zoo:")
            root = self.zoo_dir or zoo.build_zoo()
            path = root / "base" if name == "base" else root / "experts" / name
            if not path.is_dir():
                available = ["base"] + sorted(p.name for p in (root / "experts").iterdir())
                raise EvomergeError(f"unknown zoo model {name!r}; available: {', '.join(available)}")
            out = str(path)
        else:
            path = Path(ref).expanduser()
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise EvomergeError(f"model folder {ref!r} has no config.json (not a saved HF model)")
                out = str(path)
            elif _looks_local(ref):
                raise EvomergeError(f"model folder {ref!r} does not exist")
            else:
                out = ref  # a hub id: transformers resolves it
        self._resolved[ref] = out
        return out

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def config(self, ref: str):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.resolve(ref))
        except (OSError, ValueError) as e:
            raise EvomergeError(f"cannot load model config {ref!r}: {str(e).splitlines()[0]}") from None

    def check(self) -> None:
        """Fail early, from configs alone, when an expert cannot be merged with the base."""
        base = self.config(self.base)
        for name, ref in self.experts.items():
            cfg = self.config(ref)
            if cfg.model_type != base.model_type:
                raise EvomergeError(
                    f"expert {name!r} is a {cfg.model_type!r} model, the base is {base.model_type!r}"
                )
            for key in _SHAPE_KEYS:
                a, b = getattr(cfg, key, None), getattr(base, key, None)
                if a != b:
                    raise EvomergeError(
                        f"expert {name!r} has tensor shapes that differ from the base: {key} {a} vs {b}"
                    )

    def num_layers(self) -> int:
        return int(self.config(self.base).num_hidden_layers)

    def load_model(self, ref: str | None = None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        ref = ref or self.base
        try:
            with _no_progress_bars():
                model = AutoModelForCausalLM.from_pretrained(self.resolve(ref), dtype=self.torch_dtype)
        except (OSError, ValueError) as e:
            raise EvomergeError(f"cannot load model {ref!r}: {str(e).splitlines()[0]}") from None
        return model.eval()

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        ref = self.tokenizer or self.base
        try:
            tok = AutoTokenizer.from_pretrained(self.resolve(ref))
        except (OSError, ValueError) as e:
            raise EvomergeError(f"cannot load tokenizer {ref!r}: {str(e).splitlines()[0]}") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def expert_state_dicts(self) -> Mapping[str, Mapping[str, torch.Tensor]]:
        """Experts' state dicts, each loaded when read (one expert in memory at a time)."""
        return _LazyStateDicts(self)


class _LazyStateDicts(Mapping):
    def __init__(self, models: ModelSet):
        self.models = models

    def __getitem__(self, name: str) -> Mapping[str, torch.Tensor]:
        return self.models.load_model(self.models.experts[name]).state_dict()

    def __iter__(self) -> Iterator[str]:
        return iter(self.models.experts)

    def __len__(self) -> int:
        return len(self.models.experts)
