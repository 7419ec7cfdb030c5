"""A fitness backend: the mean log-likelihood a model gives to fixed texts (higher is better)."""

from pydantic import Field

from evomerge.fitness import FitnessOptions, FitnessResult, fitness_backend


class TextsOptions(FitnessOptions):
    """The mean log-likelihood a model gives to fixed texts."""

    texts: tuple[str, ...] = Field((), description="texts whose mean log-likelihood is the fitness")
    max_tokens: int = Field(512, ge=1, description="tokens of each text scored (the rest cut off)")


@fitness_backend("texts", selected_by="texts", what="texts to score", options=TextsOptions)
class TextLikelihood:
    def __init__(self, texts: list[str], max_tokens: int = 512) -> None:
        self.texts, self.max_tokens = list(texts), max_tokens

    def n_items(self, split: str) -> dict[str, int]:
        return {}  # no per-item responses: no item subsets, no IRT estimators

    def evaluate(self, model, tokenizer, split: str, items=None) -> FitnessResult:
        import torch  # here, not above: checking a config imports the options model, never torch

        total, tokens = 0.0, 0
        with torch.no_grad():
            for text in self.texts:
                ids = tokenizer(text, return_tensors="pt").input_ids[:, : self.max_tokens].to(model.device)
                total -= float(model(input_ids=ids, labels=ids).loss)
                tokens += ids.numel()
        return FitnessResult({"loglik": total / len(self.texts)}, n_items=len(self.texts), n_tokens=tokens)
