"""PEFT adapters as experts.

An expert may be a folder that PEFT saved (``adapter_config.json`` and the adapter's weights, no
``config.json``): a LoRA of any rank, or any other adapter type that PEFT can merge into the weights
(``merge_and_unload``). The adapter is applied to the run's base in memory, once per worker, and from then
on it is an ordinary expert: its task vector is the adapter's weight change, and it mixes with full
fine-tunes and adapters of other ranks in one run. mergekit loads such an expert as ``<base>+<adapter>``
and merges the adapter with PEFT the same way, so an exported recipe names it so.

Refused before anything loads: an adapter type that changes activations rather than weights (prompt and
prefix tuning, routed mixtures), an adapter of another base (``base_model_name_or_path`` against the
run's base), and one whose LoRA matrices do not fit the base's tensors.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

ADAPTER_CONFIG = "adapter_config.json"
# PEFT types whose effect depends on the input (routing between adapters), so that no fixed weights
# stand for them, though their tuner classes have merge_and_unload.
_ROUTED = {"XLORA", "POLY"}


def is_adapter(path: str | Path) -> bool:
    """A folder PEFT saved an adapter in (an adapter_config.json and no model config.json)."""
    path = Path(path).expanduser()
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


@functools.cache
def mergeable_types() -> tuple[str, ...]:
    """The PEFT adapter types that merge into weights: those whose tuner has merge_and_unload, other
    than prompt learning and routed mixtures."""
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    out = []
    for kind, config_class in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(kind)
        prompt = issubclass(config_class, PromptLearningConfig)
        if tuner is not None and hasattr(tuner, "merge_and_unload") and not prompt and kind not in _ROUTED:
            out.append(str(kind.value))
    return tuple(sorted(out))


@dataclass(frozen=True)
class Adapter:
    """What an adapter folder says of itself (its adapter_config.json)."""

    path: Path
    kind: str  # PEFT's peft_type: LORA, LOKR, IA3, ...
    base: str | None  # base_model_name_or_path
    rank: int | None  # r, where the type has one

    @classmethod
    def read(cls, name: str, path: str | Path) -> Adapter:
        """Expert ``name``'s adapter at ``path``; refuses one that cannot be merged into weights."""
        path = Path(path).expanduser()
        try:
            config: dict[str, Any] = json.loads((path / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError) as e:
            raise EvomergeError(
                f"expert {name!r}: {str(path / ADAPTER_CONFIG)!r} is not readable JSON: {e}"
            ) from None
        kind = str(config.get("peft_type", "")).upper()
        allowed = mergeable_types()
        if kind not in allowed:
            raise EvomergeError(
                f"expert {name!r} is a {kind or 'untyped'} adapter, which cannot be merged into weights; "
                f"adapter types evomerge merges: {', '.join(allowed)}"
            )
        rank = config.get("r")
        return cls(path, kind, config.get("base_model_name_or_path"), rank if isinstance(rank, int) else None)

    def describe(self) -> str:
        rank = f" of rank {self.rank}" if self.rank is not None else ""
        return f"{self.kind} adapter{rank}"

    def check_base(self, name: str, base_ref: str, base_path: str) -> None:
        """Refuse an adapter trained on another model than the run's base: its base_model_name_or_path
        must be the base's reference, its folder, a folder holding the same checkpoint (a copy), or a hub
        id whose name is the base folder's name (a local copy of a hub model, a hub cache snapshot)."""
        if not self.base or _same_model(self.base, base_ref, base_path):
            return
        raise EvomergeError(
            f"expert {name!r} is an adapter of {self.base!r} but the run's base is {base_ref!r}; "
            f"an adapter merges only onto the model it was trained on: set models.base to {self.base!r}"
        )

    def check_shapes(self, name: str, base_tensors: dict[str, Any]) -> None:
        """Refuse LoRA matrices that do not fit the base's tensors (``base_tensors``: the base's
        safetensors header entries): lora_A is (r, in), lora_B (out, r) for a weight of (out, in)."""
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            return
        from evomerge.hf import safetensors_header

        for key, entry in safetensors_header(files[0]).items():
            for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
                if not key.endswith(part):
                    continue
                module = key[: -len(part)].removeprefix("base_model.model.")
                target = base_tensors.get(f"{module}.weight")
                if target is None:
                    raise EvomergeError(
                        f"expert {name!r}: the adapter changes {module!r}, which the base does not have; "
                        "it was trained on another model"
                    )
                have, want = entry["shape"][dim], target["shape"][dim]
                if len(target["shape"]) == 2 and have != want:
                    raise EvomergeError(
                        f"expert {name!r}: the adapter's {module!r} is for a weight with "
                        f"{'inputs' if dim else 'outputs'} {have}, the base's has {want}; it was trained "
                        "on another model"
                    )

    def embedding_rows(self) -> int | None:
        """Rows of the embedding the adapter saves whole (an adapter that added tokens saves
        ``embed_tokens`` among its modules_to_save), or None."""
        from evomerge.hf import safetensors_header

        for f in sorted(self.path.glob("*.safetensors")):
            for key, entry in safetensors_header(f).items():
                if "embed_tokens" in key and key.endswith(".weight") and "lora_" not in key:
                    return int(entry["shape"][0])
        return None


def _same_model(adapter_base: str, base_ref: str, base_path: str) -> bool:
    if adapter_base in (base_ref, base_path):
        return True
    mine = Path(base_path).expanduser()
    theirs = Path(adapter_base).expanduser()
    if theirs.exists() and mine.exists():
        return theirs.resolve() == mine.resolve() or _same_files(theirs, mine)
    if mine.exists():  # a hub id against a local folder: a copy named after it, or a hub cache snapshot
        short = adapter_base.rstrip("/").split("/")[-1].lower()
        parts = [p.lower() for p in mine.resolve().parts]
        cache = "models--" + adapter_base.replace("/", "--").lower()
        return parts[-1] == short or cache in parts
    return False


def _same_files(a: Path, b: Path) -> bool:
    """Two folders holding the same checkpoint (a copy): equal config.json, and safetensors files of
    the same names, sizes and headers."""
    from evomerge.hf import safetensors_header

    def facts(folder: Path) -> Any:
        config = folder / "config.json"
        files = sorted(folder.glob("*.safetensors"))
        if not config.is_file() or not files:
            return None
        return (
            json.loads(config.read_text()),
            [(f.name, f.stat().st_size, safetensors_header(f)) for f in files],
        )

    found = facts(a)
    return found is not None and found == facts(b)


def apply_adapter(model: Any, adapter: Adapter) -> Any:
    """``model`` (a freshly loaded base, changed in place) with the adapter merged into its weights, as
    PEFT's merge_and_unload makes it (and mergekit's ``<base>+<adapter>``). A base whose embedding has
    fewer rows than the adapter saves (an adapter that added tokens) is resized first."""
    from peft import PeftModel

    rows = adapter.embedding_rows()
    if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    try:
        with warnings.catch_warnings():  # PEFT's deprecation notices are not the user's business
            warnings.simplefilter("ignore")
            merged = PeftModel.from_pretrained(
                model, str(adapter.path), is_trainable=False
            ).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise EvomergeError(
            f"cannot apply adapter {str(adapter.path)!r} to the base: {str(e).splitlines()[0]}"
        ) from None
    return merged.eval()
