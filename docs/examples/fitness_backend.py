"""A fitness backend: the mean log-likelihood a model gives to fixed texts (higher is better)."""

import torch

from evomerge.fitness import FitnessResult, fitness_backend


@fitness_backend("texts", selected_by="texts", what="texts whose likelihood is the fitness")
class TextLikelihood:
    def __init__(self, texts: list[str]) -> None:
        self.texts = list(texts)

    def n_items(self, split: str) -> dict[str, int]:
        return {}  # no per-item responses: no item subsets, no IRT estimators

    def evaluate(self, model, tokenizer, split: str, items=None) -> FitnessResult:
        total, tokens = 0.0, 0
        with torch.no_grad():
            for text in self.texts:
                ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
                total -= float(model(input_ids=ids, labels=ids).loss)
                tokens += ids.numel()
        return FitnessResult({"loglik": total / len(self.texts)}, n_items=len(self.texts), n_tokens=tokens)
