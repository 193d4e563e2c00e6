"""Tokenizer training and loading with Hugging Face `tokenizers` (byte-level BPE or WordPiece).

Run by `raygpt prepare CONFIG` on a sample of the cleaned corpus; the result is saved as RUN_DIR/data/tokenizer.json
and is what training, evaluation and generation load.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.config import DataError, TokenizerConfig


class TokenizerError(DataError):
    """A tokenizer file that cannot be used (missing, unreadable, without the end-of-text token)."""


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a new tokenizer on an iterable of documents."""
    if cfg.type == "bpe":
        # Byte-level BPE (GPT-2): every byte is in the base alphabet, so any text round-trips exactly.
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=cfg.special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        specials = cfg.special_tokens if "[UNK]" in cfg.special_tokens else [*cfg.special_tokens, "[UNK]"]
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials, show_progress=False
        )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json: a local file, or an object (s3:// / gs://, e.g. a fine-tuning base checkpoint in a bucket)."""
    from core import files

    if not files.is_file(path):
        raise TokenizerError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_str(files.read_text(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None


def eot_id(tokenizer: Tokenizer, eot_token: str) -> int:
    """Id of the end-of-text token; an error if the tokenizer does not know it."""
    token_id = tokenizer.token_to_id(eot_token)
    if token_id is None:
        raise TokenizerError(f"the tokenizer has no end-of-text token {eot_token!r} (set data.tokenizer.eot_token)")
    return token_id
