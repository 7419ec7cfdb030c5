"""Tiny real models for tests: random-init Llama models (mergekit's test habit) with the zoo tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.zoos import tiny as zoo


def llama_config(hidden: int = 32, layers: int = 4, vocab: int | None = None) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab or len(zoo.build_tokenizer()),
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def random_models(n: int, hidden: int = 32, layers: int = 4, seed: int = 0) -> list[LlamaForCausalLM]:
    torch.manual_seed(seed)
    cfg = llama_config(hidden, layers)
    return [LlamaForCausalLM(cfg).eval() for _ in range(n)]


def save_model_set(root: Path, names: list[str], hidden: int = 32, seed: int = 0) -> dict[str, Path]:
    """Save random models with the zoo tokenizer as HF folders root/<name>; returns name -> folder."""
    tok = zoo.build_tokenizer()
    out = {}
    for name, model in zip(names, random_models(len(names), hidden, seed=seed), strict=True):
        path = root / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


def demo_irt_config(zoo_dir: Path, out: Path, objectives: list[dict], algorithm: dict) -> dict:
    """The demo config (experiments/demo.yaml) with estimated ``objectives``, which choose their items,
    8 calibration merges and ``algorithm``, on the zoo built in ``zoo_dir``."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "experiments" / "demo.yaml").read_text())
    del data["fitness"]["items"]  # the estimators choose the items
    data.update(
        objectives=objectives, out=str(out), algorithm=algorithm, zoo={"cache_dir": str(zoo_dir.parent)}
    )
    data["fitness"]["calibration"] = {"random_merges": 8, "items": "all"}
    return data


def toy_run(config: str, zoo_dir: Path, out: Path, items: int) -> Path:
    """A finished run of ``experiments/<config>`` at toy size (GA of 4 x 2 generations on ``items`` items
    per task) on the zoo built in ``zoo_dir``: zoo models, lm-eval fitness, Ray workers."""
    import ray

    from evomerge.config import load_config
    from evomerge.report.page import refresher
    from evomerge.search import Search

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "experiments" / config,
        out=str(out),
        **{
            "fitness.items": items,
            "algorithm.pop_size": 4,
            "algorithm.generations": 2,
            "zoo.cache_dir": str(zoo_dir.parent),
        },
    )
    try:
        return Search(cfg, refresh=refresher()).run()
    finally:
        ray.shutdown()
