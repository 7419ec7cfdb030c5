"""Experts whose vocabulary differs from the base's (``models.vocab``).

Fine-tunes often add tokens (chat markers, a language's characters): their embedding and output matrices
have more rows than the base's. Merging needs rows that mean the same token in every model, so:

- the tokens an expert shares with the base must have the same ids in both tokenizers (else no row of the
  expert can be matched to the base's without re-indexing, and the expert is refused);
- rows of the base's tokens (and the base's padding rows, where the expert has them too) merge like any
  other tensor;
- ``vocab: base`` (the default) leaves the added tokens out: the merged model has the base's rows and the
  base's tokenizer;
- ``vocab: union`` keeps them: the merged tokenizer is the base's with each expert's added tokens appended
  (in the order of the experts, then of their ids), the merged matrices grow to match, and each added row
  is the row of the expert that added the token (the mean of those rows where several experts added the
  same token), whatever the recipe: every model's task vector is zero on it.

Methods that keep a share of each tensor's entries (ties' and breadcrumbs' density, della) count the
added rows' zero task-vector entries among a vocabulary tensor's, as mergekit's union does; elsewhere the
base's rows merge exactly as they would without the added ones.

The merge machinery sees none of this: the base model is resized and its added rows filled
(:func:`extend_base`), and each expert's vocabulary tensors are re-indexed to the merged rows as they are
read (:class:`AlignedVocab`), rows the expert lacks taking the base's value.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.errors import EvomergeError

VOCAB_MODES = ("base", "union")


@dataclass(frozen=True)
class Vocab:
    """A model's tokenizer vocabulary (None where its folder has no tokenizer: the base's is assumed) and
    the rows of its embedding matrix."""

    tokens: Mapping[str, int] | None
    rows: int


@dataclass
class Alignment:
    """How each expert's vocabulary rows map onto the merged model's: ``rows`` of the merged matrices,
    ``sources[e]`` the expert row of each merged row (-1: the base's value; None: every row is the
    expert's own, nothing to re-index), ``added[token]`` the (expert, row) pairs an added token's row is
    the mean of, ``token_ids`` the merged tokenizer's ids of the added tokens."""

    mode: str
    rows: int
    sources: dict[str, torch.Tensor | None]
    added: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    token_ids: dict[str, int] = field(default_factory=dict)

    @property
    def changes_base(self) -> bool:
        return bool(self.added) or any(s is not None for s in self.sources.values())


def check_vocab(name: str, base: Vocab, expert: Vocab, mode: str) -> list[tuple[int, str]]:
    """The (id, token) pairs expert ``name`` adds to the base's vocabulary, in id order; refuses an
    expert whose tokens shared with the base have other ids, and, for ``union``, one with rows beyond the
    base's but no tokenizer to name them."""
    if mode not in VOCAB_MODES:
        raise EvomergeError(f"models.vocab is {mode!r}; allowed: {', '.join(VOCAB_MODES)}")
    if expert.tokens is None or base.tokens is None:
        if mode == "union" and expert.rows > base.rows:
            raise EvomergeError(
                f"expert {name!r} has {expert.rows} embedding rows against the base's {base.rows} but no "
                "tokenizer to name the added tokens; save its tokenizer in its folder or use models.vocab: base"
            )
        return []
    moved = [t for t in expert.tokens.keys() & base.tokens.keys() if expert.tokens[t] != base.tokens[t]]
    if moved:
        t = min(moved, key=lambda t: base.tokens[t])  # type: ignore[index]
        raise EvomergeError(
            f"expert {name!r}'s tokenizer gives {len(moved)} of the base's tokens other ids (e.g. {t!r}: "
            f"{expert.tokens[t]} vs {base.tokens[t]}), so its embedding rows cannot be matched to the "
            f"base's; models.vocab ({', '.join(VOCAB_MODES)}) needs tokenizers that agree on shared tokens"
        )
    return sorted((i, t) for t, i in expert.tokens.items() if t not in base.tokens)


def align(mode: str, base: Vocab, experts: Mapping[str, Vocab]) -> Alignment:
    """The merged rows for ``mode``, every expert checked (:func:`check_vocab`)."""
    added_by = {name: check_vocab(name, base, v, mode) for name, v in experts.items()}
    added: dict[str, list[tuple[str, int]]] = {}
    token_ids: dict[str, int] = {}
    if mode == "union":
        next_id = len(base.tokens or {})
        for name, pairs in added_by.items():
            for i, token in pairs:
                if token not in token_ids:
                    token_ids[token] = next_id
                    next_id += 1
                if i < experts[name].rows:
                    added.setdefault(token, []).append((name, i))
    rows = max(base.rows, max(token_ids.values(), default=-1) + 1)
    sources: dict[str, torch.Tensor | None] = {}
    for name, v in experts.items():
        own = [i for i, _ in added_by[name]]
        if rows == base.rows == v.rows and not own:
            sources[name] = None
            continue
        index = torch.arange(rows)
        index[index >= min(base.rows, v.rows)] = -1
        own_ids = torch.tensor([i for i in own if i < rows], dtype=torch.long)
        index[own_ids] = -1
        sources[name] = index
    return Alignment(mode, rows, sources, added, token_ids)


def union_tokenizer(base: Any, experts: Mapping[str, Any], alignment: Alignment) -> Any:
    """The base's tokenizer with the experts' added tokens appended, each keeping its added-token
    settings (special, stripping) from the expert that added it first; ids as ``alignment`` has them."""
    if not alignment.token_ids:
        return base
    tokenizer = copy.deepcopy(base)
    found: dict[str, Any] = {}
    for expert in experts.values():
        if expert is None:
            continue
        settings = {t.content: t for t in expert.added_tokens_decoder.values()}
        for token in alignment.token_ids:
            if token not in found and token in expert.get_vocab():
                found[token] = settings.get(token, token)
    ordered = sorted(alignment.token_ids, key=alignment.token_ids.get)  # type: ignore[arg-type]
    tokenizer.add_tokens([found[t] for t in ordered])
    got = {t: tokenizer.get_vocab()[t] for t in ordered}
    if got != alignment.token_ids:  # a tokenizer with holes in its ids would give others
        raise EvomergeError("the base's tokenizer gave the experts' added tokens other ids than planned")
    return tokenizer


def vocab_names(model: torch.nn.Module) -> list[str]:
    """State-dict names of the tensors indexed by token: the input embedding, the output embedding and
    its bias (tied ones under each of their names)."""
    wanted = {model.get_input_embeddings().weight.data_ptr()}
    out = model.get_output_embeddings()
    if out is not None:
        wanted.add(out.weight.data_ptr())
        if getattr(out, "bias", None) is not None:
            wanted.add(out.bias.data_ptr())
    return [n for n, t in model.state_dict().items() if t.data_ptr() in wanted]


def extend_base(
    model: torch.nn.Module, alignment: Alignment, rows_of: Mapping[str, Mapping[str, torch.Tensor]]
) -> None:
    """Resize ``model`` (the base) to the merged rows and write each added token's row: the mean of the
    rows of the experts that added it (``rows_of[expert]``: that expert's state dict)."""
    if alignment.rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(alignment.rows, mean_resizing=False)
    if not alignment.added:
        return
    names = vocab_names(model)
    state = model.state_dict()
    with torch.no_grad():
        for token, pairs in alignment.added.items():
            row = alignment.token_ids[token]
            for name in names:
                target = state[name]
                picked = [rows_of[e][name][i].to(torch.float32) for e, i in pairs if name in rows_of[e]]
                if picked:
                    target[row] = torch.stack(picked).mean(0).to(target.dtype)


class AlignedVocab(Mapping):
    """An expert's state dict with its vocabulary tensors re-indexed to the merged rows: row r is the
    expert's row ``index[r]``, or the base's row r where that is -1. Other tensors pass through."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        index: torch.Tensor,
        base: Mapping[str, torch.Tensor],
        names: list[str],
    ):
        self.tensors, self.index, self.base, self.names = tensors, index, base, set(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        if name not in self.names:
            return t
        base = self.base[name]
        keep = self.index >= 0
        out = base.detach().to("cpu", copy=True)
        out[keep] = t[self.index[keep]].to(out.dtype)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)
