"""The zoo tasks' multiple-choice items scored in-process, as lm-eval scores a ``multiple_choice`` task
with ``target_delimiter: ""`` (the ``fitness/zoo`` tasks): a choice's score is the summed log-probability
of its tokens after the prompt, and an item is correct when the label's choice scores highest. Both zoos
measure their models with it at build time (``zoo.json``), without lm-eval's overhead."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evomerge.zoos import skills


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and ``continuation`` as lm-eval's HFLM makes them: the continuation is the
    whole text's tokens after as many as the context has (with a token across the boundary, not quite the
    continuation's own tokens)."""
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


@torch.inference_mode()
def mc_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[dict], batch_size: int = 128
) -> torch.Tensor:
    """Summed log-probabilities (items x choices) of each choice after its prompt,
    ``score(item, choice) = sum_t log p(token_t | tokens_<t)`` over the choice's tokens (:func:`encode_pair`),
    in batches of ``batch_size`` sequences sorted by length."""
    seqs, starts = [], []
    for item in items:
        for choice in item["choices"]:
            ctx, cont = encode_pair(tokenizer, item["prompt"], choice)
            seqs.append(ctx + cont)
            starts.append(len(ctx))
    was_training = model.training
    model.eval()
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    scores = torch.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]))  # little padding per batch
    for k in range(0, len(order), batch_size):
        batch = order[k : k + batch_size]
        width = max(len(seqs[j]) for j in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        for row, j in enumerate(batch):
            ids[row, : len(seqs[j])] = torch.tensor(seqs[j])
        # Token t is scored by the output at t-1; only continuation tokens count.
        pos = torch.arange(1, width)
        start = torch.tensor([starts[j] for j in batch])[:, None]
        end = torch.tensor([len(seqs[j]) for j in batch])[:, None]
        rows, cols = torch.nonzero((pos >= start) & (pos < end), as_tuple=True)
        hidden = model.base_model(input_ids=ids.to(device)).last_hidden_state
        # The output layer only where it is needed: the vocabulary is large and most positions are prompt.
        logits = head(hidden[rows.to(device), cols.to(device)]).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[rows, cols + 1].to(device)[:, None])[:, 0]
        scores[batch] = torch.zeros(len(batch)).index_add_(0, rows, logp.cpu())
    model.train(was_training)
    return scores.view(len(items), -1)


def mc_correct(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[dict], batch_size: int = 128
) -> torch.Tensor:
    """Per-item correctness (bool): the label's choice has the highest summed log-probability."""
    if not items:
        return torch.zeros(0, dtype=torch.bool)
    labels = torch.tensor([item["label"] for item in items])
    return mc_scores(model, tokenizer, items, batch_size).argmax(-1) == labels


def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: str = "test", batch_size: int = 128
) -> dict[str, float]:
    """Accuracy of ``model`` on each skill's fitness ``split`` (the mean of :func:`mc_correct`)."""
    return {
        s: float(mc_correct(model, tokenizer, skills.task_splits(s)[split], batch_size).float().mean())
        for s in skills.SKILLS
    }
