"""Unit tests of decoding, splitting and cleaning (no Ray)."""

from __future__ import annotations

import numpy as np

from data_pipeline.clean import (
    clean_batch,
    clean_text,
    decode,
    doc_hash,
    documents_batch,
    field_batch,
    split_documents,
    unit_interval,
)
from data_pipeline.config import CleanConfig


def test_decode_valid_binary_and_invalid_utf8() -> None:
    assert decode("héllo".encode(), "replace") == ("héllo", "", False)
    assert decode(b"\x7fELF\x00\x01\x02", "replace") == (None, "binary", False)
    text, reason, replaced = decode(b"ok \xff\xfe bad", "replace")
    assert text == "ok \ufffd\ufffd bad" and reason == "" and replaced
    assert decode(b"ok \xff bad", "drop") == (None, "invalid_utf8", False)


def test_split_documents_modes() -> None:
    text = "First para\nline two\n\n  \nSecond para\n\n\nThird\n"
    assert split_documents(text, "file") == [text]
    assert split_documents(text, "paragraph") == ["First para\nline two", "Second para", "Third\n"]
    assert split_documents(text, "line") == ["First para", "line two", "Second para", "Third"]


def test_clean_text_normalizes_and_strips_controls() -> None:
    cfg = CleanConfig()
    decomposed = "Cafe\u0301"  # e + combining acute accent
    assert clean_text(decomposed, cfg) == ("Café", "")
    assert clean_text("a\r\nb\rc\x00d\x1b[0m\te\x85f", cfg) == ("a\nb\ncd[0m\tef", "")
    assert clean_text(decomposed, CleanConfig(normalize="none"))[0] == decomposed
    assert clean_text("a\x00b", CleanConfig(strip_control_chars=False))[0] == "a\x00b"


def test_clean_text_length_filters() -> None:
    cfg = CleanConfig(min_chars=5, max_chars=10)
    assert clean_text("abcd", cfg) == ("", "too_short")
    assert clean_text("   \n\n   ", CleanConfig()) == ("", "too_short")
    assert clean_text("abcdefghijk", cfg) == ("", "too_long")
    assert clean_text("abcdefghij", cfg) == ("abcdefghij", "")


def test_doc_hash_is_stable_and_content_based() -> None:
    assert doc_hash("hello") == doc_hash("hello")
    assert doc_hash("hello") != doc_hash("hello ")
    assert -(1 << 63) <= doc_hash("x") < (1 << 63)


def test_unit_interval_is_uniform_and_salted() -> None:
    hashes = np.array([doc_hash(str(i)) for i in range(20_000)], dtype=np.int64)
    u = unit_interval(hashes, 1)
    assert ((0 <= u) & (u < 1)).all()
    assert abs(u.mean() - 0.5) < 0.01
    assert abs(np.corrcoef(u, unit_interval(hashes, 2))[0, 1]) < 0.03


def test_documents_batch_counts_drops_and_bytes() -> None:
    batch = {"bytes": np.array([b"one\n\ntwo", b"\x00\x01binary", b"bad \xff"], dtype=object)}
    out = documents_batch(batch, source=3, split_by="paragraph", invalid_utf8="replace")
    assert out["text"].tolist() == ["one", "two", "", "bad \ufffd"]
    assert out["drop"].tolist() == ["", "", "binary", ""]
    assert out["nbytes"].tolist() == [3, 3, 8, 7]
    assert out["utf8_replaced"].tolist() == [False, False, False, True]
    assert (out["source"] == 3).all()


def test_field_batch_missing_text_and_surrogates() -> None:
    batch = {"content": np.array(["fine", None, "lone \ud800 surrogate"], dtype=object)}
    out = field_batch(batch, source=0, field="content")
    assert out["drop"].tolist() == ["", "no_text", ""]
    assert out["text"][2] == "lone ? surrogate" and out["utf8_replaced"].tolist() == [False, False, True]


def test_clean_batch_hashes_kept_rows_only() -> None:
    batch = documents_batch(
        {"bytes": np.array([b"keep me", b"x", b"\x00bin"], dtype=object)}, 0, "file", "replace"
    )
    out = clean_batch(batch, CleanConfig(min_chars=2))
    assert out["drop"].tolist() == ["", "too_short", "binary"]
    assert out["hash"][0] == doc_hash("keep me") and out["hash"][1] == 0 and out["text"][1] == ""
