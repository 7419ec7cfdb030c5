"""GGUF files as model references: a ``.gguf`` file is dequantized once into a cached HF folder.

``<cache_dir>/gguf/<stem>-<sha256 prefix>/`` holds the model (and the tokenizer when the file has one) and
``evomerge_gguf.json``: the source file, the dtype, and whether the file had a tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from pathlib import Path

from evomerge.cache import build_once, default_cache_dir
from evomerge.errors import EvomergeError
from evomerge.hf import no_progress_bars, torch_dtype

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
        with no_progress_bars():
            loaded = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch_dtype(dtype), **kwargs
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
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch_dtype(dtype))
    model.load_state_dict(loaded.state_dict())
    del loaded
    with no_progress_bars():
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
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    suffix = "" if dtype == "float32" else f"-{dtype}"
    final = cache_dir / "gguf" / f"{path.stem}-{_sha256(path)[:12]}{suffix}"
    return build_once(final, lambda tmp: _convert_gguf(path, tmp, dtype))


def gguf_has_tokenizer(folder: str | Path) -> bool:
    """Whether a folder converted from a GGUF file holds its tokenizer (True for any other folder)."""
    info = Path(folder) / GGUF_INFO
    return not info.is_file() or json.loads(info.read_text())["tokenizer"]
