"""ModelSet: the base, the experts and the tokenizer of one merge problem.

A reference is a local HF folder, a hub id (passed through to transformers), a ``.gguf`` file (converted
once into a cached HF folder, :mod:`evomerge.gguf`) or ``<prefix>:<name>`` for a prefix registered in
:data:`REFERENCES`: the demo zoos of :mod:`evomerge.zoos` register ``zoo:`` (``zoo:base``,
``zoo:addition``, ...) and ``realzoo:``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.gguf import convert_gguf, gguf_has_tokenizer
from evomerge.hf import DTYPES, no_progress_bars, safetensors_header
from evomerge.registry import Registry

SHAPE_KEYS = (  # what an expert must share with the base to be merged with it
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "head_dim",
)


def check_mergeable(name: str, expert: Mapping[str, Any], base: Mapping[str, Any]) -> None:
    """Refuse expert ``name`` whose model type differs from the base's, or whose tensor shapes
    (``SHAPE_KEYS``, vocabulary included) do; a key either config leaves out is not compared. The configs
    are config.json's keys (``evomerge check``) or a loaded config's attributes (a run's workers)."""
    if expert.get("model_type") != base.get("model_type"):
        raise EvomergeError(
            f"expert {name!r} is a {expert.get('model_type')!r} model, the base is {base.get('model_type')!r}"
        )
    for key in SHAPE_KEYS:
        a, b = expert.get(key), base.get(key)
        if a is not None and b is not None and a != b:
            raise EvomergeError(
                f"expert {name!r} has tensor shapes that differ from the base: {key} {a} vs {b}"
            )


# How a reference that builds its model shows progress: "bar", "lines" (a line per step of a few
# percent, for output that is not a terminal), True (a bar), or None/False (nothing).
Progress = bool | str | None


def save_hf(folder: str | Path, model, tokenizer) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` as a Hugging Face folder, without progress bars."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with no_progress_bars():
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return folder


# --- model-reference prefixes ---------------------------------------------------------------------------


def _no_config(name: str) -> dict[str, Any] | None:
    return None


def _no_notice(cache_dir: Path | None) -> str | None:
    return None


@dataclass(frozen=True)
class Reference:
    """A model-reference prefix: ``<prefix>:<name>`` names a model that the prefix's own code finds or
    builds. What it declares is all that the core knows of it:

    - ``names()``: what ``<name>`` may be, known without building anything (checked before a run starts);
    - ``resolve(name, cache_dir, progress)``: the model's HF folder, built into ``cache_dir`` (None: the
      user cache) on first use and found there afterwards, showing build progress as ``progress`` says;
    - ``config(name)``: the model's config.json as a dict where it is known without building (else None);
    - ``notice(cache_dir)``: a line to show before a ``resolve`` that will build (None when it will not).
    """

    prefix: str
    names: Callable[[], Sequence[str]]
    resolve: Callable[[str, Path | None, Progress], Path]
    config: Callable[[str], dict[str, Any] | None] = _no_config
    notice: Callable[[Path | None], str | None] = _no_notice


# Prefix -> Reference. evomerge.zoos registers its prefixes when imported; the registry imports it at
# the first lookup (an entry-point table kept in code), so that importing this module imports no zoo.
REFERENCES: Registry[Reference] = Registry("model reference prefix", Reference, providers=("evomerge.zoos",))

_PREFIXED = re.compile(r"([A-Za-z][\w-]*):(.*)", re.DOTALL)


def split_reference(ref: str) -> tuple[str, str] | None:
    """``(prefix, name)`` of a ``<prefix>:<name>`` reference; None for a folder, a hub id or a GGUF file
    (neither has a colon after a leading word)."""
    found = _PREFIXED.fullmatch(ref)
    return None if found is None else (found[1], found[2])


def looks_local(ref: str) -> bool:
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
    _: KW_ONLY
    # Where references build what they build (zoos, GGUF conversions); None: the user cache.
    cache_dir: Path | None = None
    # How a reference that builds shows its progress, and where it says beforehand that it will build
    # (a console's print, say; None: nowhere).
    progress: Progress = True
    announce: Callable[[str], None] | None = None
    _resolved: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def resolve(self, ref: str) -> str:
        """A local folder path or a hub id for ``ref``; local folders must exist."""
        if ref in self._resolved:
            return self._resolved[ref]
        prefixed = split_reference(ref)
        if prefixed is not None:
            out = str(self._build_reference(*prefixed))
        elif ref.lower().endswith(".gguf"):
            out = str(convert_gguf(ref, self.dtype, self.cache_dir))
        else:
            path = Path(ref).expanduser()
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise EvomergeError(f"model folder {ref!r} has no config.json (not a saved HF model)")
                out = str(path)
            elif looks_local(ref):
                raise EvomergeError(f"model folder {ref!r} does not exist")
            else:
                out = ref  # a hub id: transformers resolves it
        self._resolved[ref] = out
        return out

    def _build_reference(self, prefix: str, name: str) -> Path:
        """The folder of ``<prefix>:<name>``, from the prefix's registered code (which may build it)."""
        reference = REFERENCES.get(prefix)
        notice = reference.notice(self.cache_dir)
        if notice and self.announce is not None:
            self.announce(notice)
        return reference.resolve(name, self.cache_dir, self.progress)

    def _check_tokenizer_source(self) -> None:
        """A GGUF file without tokenizer data cannot be the tokenizer source."""
        ref = self.tokenizer or self.base
        if not gguf_has_tokenizer(self.resolve(ref)):
            raise EvomergeError(
                f"GGUF file {ref!r} holds no tokenizer data; set models.tokenizer to an HF folder or hub id"
            )

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
        """Fail early, from configs alone, when an expert cannot be merged with the base or the tokenizer
        source has no tokenizer."""
        self._check_tokenizer_source()

        def facts(cfg: Any) -> dict[str, Any]:
            return {key: getattr(cfg, key, None) for key in ("model_type", *SHAPE_KEYS)}

        base = facts(self.config(self.base))
        for name, ref in self.experts.items():
            check_mergeable(name, facts(self.config(ref)), base)

    def num_layers(self) -> int:
        return int(self.config(self.base).num_hidden_layers)

    def load_model(self, ref: str | None = None, device: str | None = None) -> torch.nn.Module:
        """A model (the base by default) in the compute dtype, loaded straight onto ``device`` (None or
        cpu: host memory; ``cuda``: one GPU; ``auto``: spread over the visible GPUs)."""
        from transformers import AutoModelForCausalLM

        ref = ref or self.base
        place = {} if device in (None, "cpu") else {"device_map": device}
        try:
            with no_progress_bars():
                model = AutoModelForCausalLM.from_pretrained(
                    self.resolve(ref), dtype=self.torch_dtype, **place
                )
        except (OSError, ValueError) as e:
            raise EvomergeError(f"cannot load model {ref!r}: {str(e).splitlines()[0]}") from None
        return model.eval()

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        self._check_tokenizer_source()
        ref = self.tokenizer or self.base
        try:
            tok = AutoTokenizer.from_pretrained(self.resolve(ref))
        except (OSError, ValueError) as e:
            raise EvomergeError(f"cannot load tokenizer {ref!r}: {str(e).splitlines()[0]}") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def expert_state_dicts(self, names: Collection[str] = ()) -> Mapping[str, Mapping[str, torch.Tensor]]:
        """Experts' state dicts, each loaded when read (one expert in memory at a time). An expert saved
        as safetensors whose tensor names are among ``names`` (the base model's state dict) is read
        tensor by tensor as it is stored, without building a model; others load as models."""
        return _LazyStateDicts(self, frozenset(names))


class SafetensorsDict(Mapping):
    """The tensors of a model's safetensors files, each read from disk when looked up (memory-mapped,
    in the stored dtype, on the CPU): a checkpoint is never held whole in memory. Each file is opened
    (and its header parsed) once, on its first lookup."""

    def __init__(self, files: Sequence[Path]):
        self.where = {key: f for f in files for key in safetensors_header(f)}
        self._open: dict[Path, Any] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self.where[name]
        if f not in self._open:
            self._open[f] = safe_open(f, "pt")
        return self._open[f].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


class _LazyStateDicts(Mapping):
    def __init__(self, models: ModelSet, names: frozenset[str]):
        self.models = models
        self.names = names

    def __getitem__(self, name: str) -> Mapping[str, torch.Tensor]:
        ref = self.models.experts[name]
        files = sorted(Path(self.models.resolve(ref)).glob("*.safetensors"))
        if files and self.names:
            tensors = SafetensorsDict(files)
            if set(tensors) <= self.names:  # stored under the model's own names (no key conversion)
                return tensors
        return self.models.load_model(ref).state_dict()

    def __iter__(self) -> Iterator[str]:
        return iter(self.models.experts)

    def __len__(self) -> int:
        return len(self.models.experts)
