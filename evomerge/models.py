"""ModelSet: the base, the experts and the tokenizer of one merge problem.

A reference is a local HF folder, a hub id (passed through to transformers), a ``.gguf`` file (converted
once into a cached HF folder), ``zoo:<name>`` for the tiny zoo that evomerge builds itself (``zoo:base``,
``zoo:addition``, ...) or ``realzoo:<name>`` for the SmolLM2-135M zoo (:mod:`evomerge.realzoo`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
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


def build_once(
    final: Path,
    build: Callable[[Path], None],
    force: bool = False,
    complete: Callable[[Path], bool] = Path.is_dir,
) -> Path:
    """``final``, made by ``build(tmp)`` into a temporary sibling folder renamed into place under a file
    lock: a build that fails leaves nothing behind, the folder of one killed outright (SIGKILL, power
    loss: no ``finally`` ran) is removed by the next call, and a process that waited for the lock reuses
    the result. ``complete(final)`` says whether an existing folder can be trusted."""
    final = Path(final)
    if complete(final) and not force and not _stale_builds(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in _stale_builds(final):  # no build writes them: every build of `final` holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        if complete(final) and not force:
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _stale_builds(final: Path) -> list[Path]:
    """The temporary folders of builds of ``final`` left behind: mkdtemp's exact names
    (``.{name}-`` and 8 characters), never those of another ``{name}-...`` folder's builds."""
    if not final.parent.is_dir():
        return []
    name = re.compile(rf"\.{re.escape(final.name)}-[a-z0-9_]{{8}}")
    return [p for p in final.parent.iterdir() if name.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]


# --- GGUF files -----------------------------------------------------------------------------------------

# Written into each converted folder: the source file, the dtype, and whether the file had a tokenizer.
GGUF_INFO = "evomerge_gguf.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_architectures() -> list[str]:
    """The GGUF architectures that the installed transformers can load."""
    names: set[str] = set()
    with contextlib.suppress(ImportError):
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    with contextlib.suppress(ImportError):
        from transformers.integrations.gguf import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    return sorted(names - {"general", "tokenizer"})


def _gguf_strings(path: Path, keys: tuple[str, ...]) -> dict[str, str | None]:
    """String metadata fields of a GGUF file (None when absent)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise EvomergeError(f"{str(path)!r} is not a readable GGUF file: {str(e).splitlines()[0]}") from None
    out: dict[str, str | None] = {}
    for key in keys:
        found = reader.get_field(key)
        out[key] = None if found is None else bytes(found.parts[found.data[0]]).decode()
    return out


def _convert_gguf(path: Path, out: Path, dtype: str) -> None:
    """Dequantize GGUF file ``path`` into the HF folder ``out`` (model, and tokenizer when the file has one)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta = _gguf_strings(path, ("general.architecture", "tokenizer.ggml.model"))
    folder, name = str(path.parent), path.name
    kwargs = {}
    # transformers >= 5 can keep a GGUF's blocks packed; ask for plain (dequantized) weights.
    with contextlib.suppress(ImportError):
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        with _no_progress_bars():
            loaded = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=DTYPES[dtype], **kwargs
            )
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        arch, supported = meta["general.architecture"], gguf_architectures()
        if arch is not None and _plain(arch) not in {_plain(a) for a in supported}:
            raise EvomergeError(
                f"GGUF file {str(path)!r} has architecture {arch!r}, which transformers cannot load; "
                f"supported: {', '.join(supported)}"
            ) from None
        raise EvomergeError(f"cannot convert GGUF file {str(path)!r}: {str(e).splitlines()[0]}") from None
    # A GGUF-loaded model keeps a quantizer that refuses to save: copy its weights into a plain model.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=DTYPES[dtype])
    model.load_state_dict(loaded.state_dict())
    del loaded
    with _no_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    has_tokenizer = meta["tokenizer.ggml.model"] is not None
    if has_tokenizer:
        try:
            AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
        except (OSError, ValueError, KeyError) as e:
            raise EvomergeError(
                f"cannot convert the tokenizer of GGUF file {str(path)!r}: {str(e).splitlines()[0]}"
            ) from None
    info = {"source": str(path.resolve()), "dtype": dtype, "tokenizer": has_tokenizer}
    (out / GGUF_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _plain(arch: str) -> str:
    """An architecture name without separators: GGUF files write "qwen2moe" where transformers has "qwen2_moe"."""
    return arch.replace("_", "").replace("-", "")


def convert_gguf(path: str | Path, dtype: str = "float32", cache_dir: Path | None = None) -> Path:
    """The HF folder converted from GGUF file ``path`` (weights dequantized to ``dtype``), made once and
    cached as ``<cache_dir>/gguf/<stem>-<sha256 prefix>/`` (a ``-<dtype>`` suffix unless float32)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvomergeError(f"GGUF file {str(path)!r} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise EvomergeError("reading GGUF files needs the gguf package: pip install 'evomerge[gguf]'")
    if cache_dir is None:
        from evomerge.zoo import default_cache_dir

        cache_dir = default_cache_dir()
    suffix = "" if dtype == "float32" else f"-{dtype}"
    final = Path(cache_dir) / "gguf" / f"{path.stem}-{_sha256(path)[:12]}{suffix}"
    return build_once(final, lambda tmp: _convert_gguf(path, tmp, dtype))


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
    zoo_dir: Path | None = None
    realzoo_dir: Path | None = None
    # Where GGUF conversions and the real zoo are cached (default: the user cache).
    cache_dir: Path | None = None
    _resolved: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def resolve(self, ref: str) -> str:
        """A local folder path or a hub id for ``ref``; local folders must exist."""
        if ref in self._resolved:
            return self._resolved[ref]
        if ref.startswith(("zoo:", "realzoo:")):
            out = str(self._zoo_model(ref))
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

    def _zoo_model(self, ref: str) -> Path:
        kind, name = ref.split(":", 1)
        if kind == "zoo":
            from evomerge import zoo

            root = self.zoo_dir or zoo.build_zoo()
        else:
            from evomerge import realzoo

            root = self.realzoo_dir or realzoo.build_real_zoo(self.cache_dir)
        path = root / "base" if name == "base" else root / "experts" / name
        if not path.is_dir():
            available = ["base"] + sorted(p.name for p in (root / "experts").iterdir())
            raise EvomergeError(f"unknown {kind} model {name!r}; available: {', '.join(available)}")
        return path

    def _check_tokenizer_source(self) -> None:
        """A GGUF file without tokenizer data cannot be the tokenizer source."""
        ref = self.tokenizer or self.base
        info = Path(self.resolve(ref)) / GGUF_INFO
        if info.is_file() and not json.loads(info.read_text())["tokenizer"]:
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

        self._check_tokenizer_source()
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
