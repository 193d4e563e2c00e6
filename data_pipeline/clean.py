"""Per-document decoding, splitting, cleaning and hashing: pure functions that `prepare` runs in Ray Data batches.

Used by `raygpt prepare CONFIG` (see `data_pipeline.prepare`); unit-tested without Ray in tests/data_pipeline.
A document that is dropped keeps its row with an empty text and a reason in `drop`, so that every drop is counted.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import numpy as np

from data_pipeline.config import CleanConfig

# Columns of a document row after reading and cleaning.
TEXT, SOURCE, NBYTES, DROP, REPLACED, HASH = "text", "source", "nbytes", "drop", "utf8_replaced", "hash"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
_BINARY_PROBE = 8192


def looks_binary(raw: bytes) -> bool:
    """A NUL byte in the first 8 KiB marks a binary file (what git and grep use)."""
    return b"\x00" in raw[:_BINARY_PROBE]


def decode(raw: bytes, invalid_utf8: str) -> tuple[str | None, str, bool]:
    """Bytes → (text, drop reason, replaced?). Binary data and, with invalid_utf8='drop', bad UTF-8 give text None."""
    if looks_binary(raw):
        return None, "binary", False
    try:
        return raw.decode("utf-8"), "", False
    except UnicodeDecodeError:
        if invalid_utf8 == "drop":
            return None, "invalid_utf8", False
        return raw.decode("utf-8", errors="replace"), "", True


def split_documents(text: str, split_by: str) -> list[str]:
    """One text → its documents; blank paragraphs and blank lines are separators, not documents."""
    if split_by == "file":
        return [text]
    parts = _PARAGRAPH_BREAK.split(text) if split_by == "paragraph" else text.splitlines()
    return [p for p in parts if p.strip()]


def clean_text(text: str, cfg: CleanConfig) -> tuple[str, str]:
    """Normalize and filter one document → (cleaned text, drop reason or '')."""
    if cfg.normalize != "none":
        text = unicodedata.normalize(cfg.normalize, text)
    if cfg.strip_control_chars:
        text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if len(text) < cfg.min_chars or not text.strip():
        return "", "too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "", "too_long"
    return text, ""


def doc_hash(text: str) -> int:
    """64-bit content hash (BLAKE2b) of a document's UTF-8 bytes, as a signed int64."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def unit_interval(hashes: np.ndarray, salt: int) -> np.ndarray:
    """Map int64 hashes to [0, 1) with the splitmix64 finalizer; different salts give independent draws."""
    with np.errstate(over="ignore"):
        z = hashes.astype(np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def documents_batch(batch: dict[str, np.ndarray], source: int, split_by: str, invalid_utf8: str) -> dict[str, Any]:
    """Ray Data batch of whole files (column `bytes`) of one source → one row per document (not yet cleaned)."""
    texts: list[str] = []
    sources: list[int] = []
    nbytes: list[int] = []
    drops: list[str] = []
    replaced: list[bool] = []
    for raw in batch["bytes"]:
        text, reason, was_replaced = decode(bytes(raw), invalid_utf8)
        if text is None:  # the whole file is one dropped document
            texts.append("")
            sources.append(source)
            nbytes.append(len(raw))
            drops.append(reason)
            replaced.append(False)
            continue
        for doc in split_documents(text, split_by):
            texts.append(doc)
            sources.append(source)
            nbytes.append(len(doc.encode("utf-8")))
            drops.append("")
            replaced.append(was_replaced)
    return {
        TEXT: np.array(texts, dtype=object),
        SOURCE: np.array(sources, dtype=np.int32),
        NBYTES: np.array(nbytes, dtype=np.int64),
        DROP: np.array(drops, dtype=object),
        REPLACED: np.array(replaced, dtype=bool),
    }


def _valid_utf8(text: str) -> tuple[str, bool]:
    """Strings decoded from JSON may hold lone surrogates, which have no UTF-8 form: replace them."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8"), True


def field_batch(batch: dict[str, np.ndarray], source: int, field: str) -> dict[str, Any]:
    """Ray Data batch of records (JSONL, Parquet, HF) → one document row per record; a missing text is 'no_text'."""
    rows = [_valid_utf8(v) if isinstance(v, str) else ("", False) for v in batch[field]]
    return {
        TEXT: np.array([text for text, _ in rows], dtype=object),
        SOURCE: np.full(len(rows), source, dtype=np.int32),
        NBYTES: np.array([len(text.encode("utf-8")) for text, _ in rows], dtype=np.int64),
        DROP: np.array(["" if isinstance(v, str) else "no_text" for v in batch[field]], dtype=object),
        REPLACED: np.array([replaced for _, replaced in rows], dtype=bool),
    }


def clean_batch(batch: dict[str, np.ndarray], cfg: CleanConfig) -> dict[str, Any]:
    """Ray Data batch of documents → cleaned text, drop reason and content hash per row."""
    texts = batch[TEXT]
    drops = batch[DROP].copy()
    cleaned = np.empty(len(texts), dtype=object)
    hashes = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        if drops[i]:
            cleaned[i] = ""
            continue
        cleaned[i], drops[i] = clean_text(text, cfg)
        if not drops[i]:
            hashes[i] = doc_hash(cleaned[i])
    return {**batch, TEXT: cleaned, DROP: drops, HASH: hashes}
