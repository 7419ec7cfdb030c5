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
