"""Extending a pretrained checkpoint's vocabulary with the chat tokens it lacks: the tokenizer gains them as special
tokens (new ids after the last), the embedding (and an untied output projection) gains rows initialised to the mean
of the trained rows, so a new token starts as an "average" token rather than as noise of another scale.

Used by the finetune stage (`raygpt finetune CONFIG`: `cluster.pipeline.run_finetune` writes the extended tokenizer
the chat data is prepared with; the training workers grow the base weights with `grow_embeddings`).

    python -m model.vocab BASE_TOKENIZER.json     # the chat tokens it lacks
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from tokenizers import AddedToken, Tokenizer

from core.chat import CHAT_TOKENS

EMBEDDINGS = ("wte.weight", "lm_head.weight")
"""The state-dict entries with one row per token (the same tensor when tied)."""


def missing_chat_tokens(tokenizer: Tokenizer) -> list[str]:
    """ChatML's turn tokens the tokenizer does not have."""
    return [t for t in CHAT_TOKENS if tokenizer.token_to_id(t) is None]


def extend_tokenizer(tokenizer: Tokenizer, tokens: Sequence[str]) -> Tokenizer:
    """A copy of the tokenizer with `tokens` added as special tokens (ids after its last one)."""
    extended = Tokenizer.from_str(tokenizer.to_str())
    extended.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    return extended


def added_ids(base: Tokenizer, extended: Tokenizer) -> dict[int, str]:
    """id → token of what `extended` adds to `base`, every token of `base` keeping its id; a ValueError otherwise
    (another tokenizer, not an extension)."""
    base_vocab, extended_vocab = base.get_vocab(with_added_tokens=True), extended.get_vocab(with_added_tokens=True)
    if any(extended_vocab.get(token) != i for token, i in base_vocab.items()):
        raise ValueError("the tokenizer is not the base model's (its tokens have other ids)")
    added = {i: token for token, i in extended_vocab.items() if token not in base_vocab}
    if sorted(added) != list(range(len(base_vocab), len(extended_vocab))):
        raise ValueError("the added tokens do not follow the base vocabulary")
    return dict(sorted(added.items()))


def grow_embeddings(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """The state dict with its token rows grown to `vocab_size`: the new rows are the mean of the old ones."""
    grown = dict(state)
    done: dict[int, torch.Tensor] = {}  # a tied output projection is the embedding: grown once, shared
    for key in EMBEDDINGS:
        if key not in state:
            continue
        old = state[key]  # (V_old, C)
        if id(old) not in done:
            rows = old.new_empty(vocab_size - old.shape[0], old.shape[1])
            rows[:] = old.float().mean(dim=0).to(old.dtype)
            done[id(old)] = torch.cat([old, rows])  # (V_new, C)
        grown[key] = done[id(old)]
    return grown


if __name__ == "__main__":
    print(missing_chat_tokens(Tokenizer.from_file(sys.argv[1])) or "has every chat token")
