"""Python fitness functions for the search-engine tests (imported by Ray workers: PYTHONPATH=tests)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

# The merged weights of the tiny random models are a smooth function of the genome: these targets make
# a two-objective problem whose front is not a single point.
TARGET = 0.02


def closeness(model, tokenizer) -> dict[str, float]:
    """Two objectives from the merged weights, plus a per-item response vector."""
    time.sleep(float(os.environ.get("EVOMERGE_TEST_SLEEP", "0")))
    w = model.lm_head.weight
    first = -abs(float(w[: w.shape[0] // 2].mean()) - TARGET)
    second = -abs(float(w[w.shape[0] // 2 :].std()) - 2 * TARGET)
    return {"first": first, "second": second, "mean": (first + second) / 2}


def with_responses(model, tokenizer):
    values = closeness(model, tokenizer)
    return values, {
        "probe": {str(i): float(v > 0) for i, v in enumerate(model.lm_head.weight[:5, 0].tolist())}
    }


def _first_time(model, marker: str) -> bool:
    """True the first time it is asked about ``marker``: a file of that name beside the models remembers."""
    path = Path(model.config.name_or_path).parent / marker
    if path.exists():
        return False
    path.write_text(str(os.getpid()))
    return True


def crash_once(model, tokenizer) -> dict[str, float]:
    """Kills its worker process the first time it runs."""
    if _first_time(model, "crashed"):
        os._exit(1)
    return closeness(model, tokenizer)


def nan(model, tokenizer) -> dict[str, float]:
    return {"mean": float("nan")}


def not_a_number(model, tokenizer) -> dict[str, float]:
    return {"mean": "high"}


def lacks_objective(model, tokenizer) -> dict[str, float]:
    return {"other": 1.0}


def loss(model, tokenizer) -> dict[str, float]:
    with torch.no_grad():
        ids = torch.arange(8).unsqueeze(0)
        return {"mean": float(model(input_ids=ids, labels=ids).loss)}


def hang_once(model, tokenizer) -> dict[str, float]:
    """Hangs (far past any test's timeout) the first time it runs."""
    if _first_time(model, "hung"):
        time.sleep(3600)
    return closeness(model, tokenizer)


def broken_until_fixed(model, tokenizer) -> dict[str, float]:
    """Fails the same way for every candidate until a file named ``fixed`` exists beside the models
    (a setup problem the user then fixes)."""
    if not (Path(model.config.name_or_path).parent / "fixed").exists():
        raise RuntimeError("the fitness data is not there yet")
    return closeness(model, tokenizer)


def through_the_layers(model, tokenizer) -> dict[str, float]:
    """Two objectives from the model's logits on fixed tokens (so a data flow's layers count)."""
    tokens = torch.arange(1, 9).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        logits = model(tokens).logits.double()
    return {"level": -abs(float(logits.mean())), "spread": float(logits.std())}


def vocab_agrees(model, tokenizer) -> dict[str, float]:
    """closeness, and whether the worker's tokenizer has a row for each of its tokens and reads
    ``<think>`` (a token experts added) as one id: 1 or 0."""
    values = closeness(model, tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    ids = tokenizer("<think>", add_special_tokens=False).input_ids
    values["agrees"] = float(len(tokenizer) == rows and len(ids) == 1 and ids[0] < rows)
    return values
