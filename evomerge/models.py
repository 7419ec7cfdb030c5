"""ModelSet: the base, the experts and the tokenizer of one merge problem.

A reference is a local HF folder, a hub id (passed through to transformers), a ``.gguf`` file (converted
once into a cached HF folder, :mod:`evomerge.gguf`) or ``<prefix>:<name>`` for a prefix registered in
:data:`REFERENCES` (entry points ``evomerge.model_references``): the demo zoos of :mod:`evomerge.zoos` register ``zoo:`` (``zoo:base``,
``zoo:addition``, ...) and ``realzoo:``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.adapters import Adapter, apply_adapter, is_adapter
from evomerge.errors import EvomergeError
from evomerge.gguf import convert_gguf, gguf_has_tokenizer
from evomerge.hf import no_progress_bars, safetensors_header
from evomerge.registry import Registry
from evomerge.vocab import AlignedVocab, Alignment, Vocab, align, extend_base, union_tokenizer, vocab_names

SHAPE_KEYS = (  # what an expert must share with the base to be merged with it
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)  # the vocabulary may differ: evomerge.vocab matches rows by token


def check_mergeable(name: str, expert: Mapping[str, Any], base: Mapping[str, Any]) -> None:
    """Refuse expert ``name`` whose model type differs from the base's, or whose tensor shapes
    (``SHAPE_KEYS``) do; a key either config leaves out is not compared. The configs are config.json's
    keys (``evomerge check``) or a loaded config's attributes (a run's workers)."""
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


# Files one of which a folder holding a tokenizer has (fast, sentencepiece, BPE vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")

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


# Prefix -> Reference. Prefixes register through the ``evomerge.model_references`` entry points (the demo
# zoos' in evomerge's pyproject.toml), read at the first lookup: the core names no zoo.
REFERENCES: Registry[Reference] = Registry(
    "model reference prefix", Reference, group="evomerge.model_references"
)

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
    vocab: str = "base"  # experts' added tokens: left out (base) or kept (union); evomerge.vocab
    _: KW_ONLY
    # Where references build what they build (zoos, GGUF conversions); None: the user cache.
    cache_dir: Path | None = None
    # How a reference that builds shows its progress, and where it says beforehand that it will build
    # (a console's print, say; None: nowhere).
    progress: Progress = True
    announce: Callable[[str], None] | None = None
    _resolved: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _alignment: Alignment | None = field(default=None, init=False, repr=False)
    _vocab_names: list[str] | None = field(default=None, init=False, repr=False)
    _adapters: dict[str, Adapter | None] = field(default_factory=dict, init=False, repr=False)
    _vocabs: dict[str, Vocab] = field(default_factory=dict, init=False, repr=False)

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
                if not (path / "config.json").is_file() and not is_adapter(path):
                    raise EvomergeError(
                        f"model folder {ref!r} has neither a config.json (a saved HF model) nor an "
                        "adapter_config.json (a PEFT adapter)"
                    )
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
        return getattr(torch, self.dtype)

    def adapter(self, ref: str) -> Adapter | None:
        """The PEFT adapter ``ref`` names (an expert), or None for a model; read once."""
        if ref not in self._adapters:
            path = self.resolve(ref)
            name = next((k for k, v in self.experts.items() if v == ref), ref)
            self._adapters[ref] = Adapter.read(name, path) if is_adapter(path) else None
        return self._adapters[ref]

    def config(self, ref: str):
        """The model config of ``ref`` (an adapter's: its base's)."""
        from transformers import AutoConfig

        if self.adapter(ref) is not None:
            ref = self.base
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
            adapter = self.adapter(ref)
            if adapter is None:
                check_mergeable(name, facts(self.config(ref)), base)
                continue
            adapter.check_base(name, self.base, self.resolve(self.base))
            files = sorted(Path(self.resolve(self.base)).glob("*.safetensors"))
            adapter.check_shapes(name, {k: v for f in files for k, v in safetensors_header(f).items()})
        self.alignment()

    # --- vocabularies --------------------------------------------------------------------------------------
    def vocab_of(self, ref: str) -> Vocab:
        """``ref``'s tokenizer vocabulary (None where its folder holds no tokenizer) and embedding rows;
        read once."""
        if ref not in self._vocabs:
            self._vocabs[ref] = self._read_vocab(ref)
        return self._vocabs[ref]

    def _read_vocab(self, ref: str) -> Vocab:
        from transformers import AutoTokenizer

        adapter = self.adapter(ref) if ref != self.base else None
        rows = (adapter.embedding_rows() if adapter else None) or getattr(
            self.config(ref).get_text_config(decoder=True), "vocab_size", None
        )
        path = Path(self.resolve(self.tokenizer or ref) if ref == self.base else self.resolve(ref))
        tokens = None
        # a folder without tokenizer files (an adapter, a bare checkpoint) uses the base's; a hub id is asked
        if not path.is_dir() or any((path / f).is_file() for f in TOKENIZER_FILES):
            try:
                tokens = dict(AutoTokenizer.from_pretrained(path).get_vocab())
            except (OSError, ValueError, TypeError):
                tokens = None
        return Vocab(tokens, int(rows or len(tokens or ())))

    def alignment(self) -> Alignment:
        """How the experts' vocabulary rows map onto the merged model's (``models.vocab``); refuses
        experts whose tokenizers disagree with the base's on shared tokens."""
        if self._alignment is None:
            base = self.vocab_of(self.base)
            experts = {name: self.vocab_of(ref) for name, ref in self.experts.items()}
            self._alignment = align(self.vocab, base, experts)
        return self._alignment

    def num_layers(self) -> int:
        return int(self.config(self.base).num_hidden_layers)

    def load_model(self, ref: str | None = None, device: str | None = None) -> torch.nn.Module:
        """A model in the compute dtype, loaded straight onto ``device`` (None or cpu: host memory;
        ``cuda``: one GPU; ``auto``: spread over the visible GPUs). The base (the default) comes with the
        merged vocabulary's rows (``alignment``); an adapter expert as its base with the adapter merged in."""
        if ref is None or ref == self.base:
            model = self._load(self.base, device)
            self._vocab_names = vocab_names(model)
            alignment = self.alignment()
            if alignment.changes_base:
                adders = {e for pairs in alignment.added.values() for e, _ in pairs}
                names = model.state_dict()
                extend_base(model, alignment, {e: self._expert_tensors(e, names) for e in adders})
            return model
        adapter = self.adapter(ref)
        if adapter is not None:
            return apply_adapter(self._load(self.base, device), adapter)
        return self._load(ref, device)

    def _load(self, ref: str, device: str | None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

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
        """The merged model's tokenizer: the tokenizer source's, with the experts' added tokens for
        ``vocab: union``."""
        self._check_tokenizer_source()
        tok = self._tokenizer(self.tokenizer or self.base)
        alignment = self.alignment()
        if alignment.token_ids:
            experts = {name: self._tokenizer(ref, missing_ok=True) for name, ref in self.experts.items()}
            tok = union_tokenizer(tok, experts, alignment)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def _tokenizer(self, ref: str, missing_ok: bool = False):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.resolve(ref))
        except (OSError, ValueError, TypeError) as e:
            if missing_ok:
                return None
            raise EvomergeError(f"cannot load tokenizer {ref!r}: {str(e).splitlines()[0]}") from None

    def expert_state_dicts(
        self, base: Mapping[str, torch.Tensor] | None = None
    ) -> Mapping[str, Mapping[str, torch.Tensor]]:
        """Experts' state dicts, each loaded when read (one expert in memory at a time). An expert saved
        as safetensors whose tensor names are among ``base``'s (the base model's state dict, as
        ``load_model`` gives it) is read tensor by tensor as it is stored, without building a model;
        others load as models, adapters as the base with the adapter merged in. Vocabulary tensors come
        re-indexed to the base's rows (``alignment``)."""
        return _LazyStateDicts(self, base or {})

    def vocab_names(self, base: Mapping[str, torch.Tensor]) -> list[str]:
        """The names of the base's tensors indexed by token (embeddings, lm_head): as ``load_model`` found
        them, else those of the merged rows whose names say embedding or head."""
        if self._vocab_names is not None:
            return self._vocab_names
        rows = self.alignment().rows
        hints = ("embed", "lm_head", "wte", "output")
        return [n for n, t in base.items() if t.ndim and t.shape[0] == rows and any(h in n for h in hints)]

    def _expert_tensors(self, name: str, base: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Expert ``name``'s tensors as stored (or its model's state dict); ``base`` gives the names."""
        ref = self.experts[name]
        files = sorted(Path(self.resolve(ref)).glob("*.safetensors"))
        if files and base and self.adapter(ref) is None:
            tensors = SafetensorsDict(files)
            if set(tensors) <= set(base):  # stored under the model's own names (no key conversion)
                return tensors
        return self.load_model(ref).state_dict()


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
    def __init__(self, models: ModelSet, base: Mapping[str, torch.Tensor]):
        self.models = models
        self.base = base

    def __getitem__(self, name: str) -> Mapping[str, torch.Tensor]:
        tensors = self.models._expert_tensors(name, self.base)
        index = self.models.alignment().sources[name]
        if index is None or not self.base:
            return tensors
        return AlignedVocab(tensors, index, self.base, self.models.vocab_names(self.base))

    def __iter__(self) -> Iterator[str]:
        return iter(self.models.experts)

    def __len__(self) -> int:
        return len(self.models.experts)
