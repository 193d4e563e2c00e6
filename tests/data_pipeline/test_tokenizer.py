"""Tokenizer training and loading (no Ray)."""

from __future__ import annotations

import pytest

from data_pipeline.config import TokenizerConfig
from data_pipeline.tokenizer import TokenizerError, eot_id, load_tokenizer, train_tokenizer

CORPUS = ["def add(a, b):\n    return a + b\n", "Ünïcödé text — with «quotes» and emoji 🙂\n"] * 50


def test_byte_level_bpe_round_trips_any_text(tmp_path) -> None:
    tokenizer = train_tokenizer(iter(CORPUS), TokenizerConfig(vocab_size=300))
    assert tokenizer.get_vocab_size() == 300
    assert eot_id(tokenizer, "<|endoftext|>") == 0
    unseen = "zebra\t\x7f 日本語 \U0001f680"
    assert tokenizer.decode(tokenizer.encode(unseen).ids) == unseen
    assert len(tokenizer.encode(CORPUS[0]).ids) < len(CORPUS[0].encode())  # merges were learned
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    assert load_tokenizer(path).encode(CORPUS[1]).ids == tokenizer.encode(CORPUS[1]).ids


def test_training_is_deterministic() -> None:
    cfg = TokenizerConfig(vocab_size=400)
    assert train_tokenizer(iter(CORPUS), cfg).to_str() == train_tokenizer(iter(CORPUS), cfg).to_str()


def test_wordpiece_alternative() -> None:
    tokenizer = train_tokenizer(iter(CORPUS), TokenizerConfig(type="wordpiece", vocab_size=200))
    assert tokenizer.token_to_id("[UNK]") is not None and eot_id(tokenizer, "<|endoftext|>") == 0
    assert "return" in tokenizer.decode(tokenizer.encode("return a").ids)


def test_bad_tokenizer_files(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    tokenizer = train_tokenizer(iter(CORPUS), TokenizerConfig(vocab_size=300, special_tokens=["<s>"], eot_token="<s>"))
    with pytest.raises(TokenizerError, match="no end-of-text token"):
        eot_id(tokenizer, "<|endoftext|>")


def test_a_tokenizer_loads_from_a_bucket(s3_bucket: str, tokenizer_file) -> None:
    """data.tokenizer.path may be an object (a fine-tuning run's base checkpoint in a bucket)."""
    from core import files

    uri = f"{s3_bucket}/tokenizer-test/tokenizer.json"
    files.atomic_write(uri, tokenizer_file.read_text())
    assert load_tokenizer(uri).to_str() == load_tokenizer(tokenizer_file).to_str()
    with pytest.raises(TokenizerError, match=f"^tokenizer file not found: {s3_bucket}/tokenizer-test/none.json$"):
        load_tokenizer(f"{s3_bucket}/tokenizer-test/none.json")
