"""Corpus-wide deduplication, exact (content hash) and near-duplicate (MinHash + LSH): pure numpy.

Run by `raygpt prepare CONFIG` in the bucket tasks of `data_pipeline.passes`, which bring together what must meet:
  - near duplicates: every document's LSH band keys are bucketed by key, so all documents sharing a band meet in one
    task, where `band_collisions` names every one but the smallest hash as a near duplicate;
  - exact duplicates: every copy of a content hash (and the near-duplicate names) meets in the task of its hash
    bucket, where `duplicate_reasons` decides.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import numpy as np

from data_pipeline.clean import HASH
from data_pipeline.config import MinHashConfig

_PRIME = np.uint64((1 << 31) - 1)


def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (seeded) coefficients of the hash family h(x) = (a·x + b) mod p; a, b < p < 2^31 so a·x fits in 64 bits."""
    rng = np.random.default_rng(0x5EED)
    a = rng.integers(1, int(_PRIME), size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(_PRIME), size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signature(text: str, ngram: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature (num_perm,) of the set of word n-gram shingles of a document."""
    words = text.split()
    count = max(1, len(words) - ngram + 1)
    shingles = {" ".join(words[i : i + ngram]) for i in range(count)}
    x = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles), dtype=np.uint64, count=len(shingles))
    x %= _PRIME
    return ((a[:, None] * x[None, :] + b[:, None]) % _PRIME).min(axis=1)  # (num_perm, S) → (num_perm,)


def band_keys(signature: np.ndarray, bands: int) -> list[int]:
    """One int64 key per LSH band: the hash of (band index, that band's rows of the signature)."""
    rows = signature.reshape(bands, -1).astype(np.uint32)
    return [
        int.from_bytes(hashlib.blake2b(bytes([i % 256]) + row.tobytes(), digest_size=8).digest(), "little", signed=True)
        for i, row in enumerate(rows)
    ]


def band_rows(texts: np.ndarray, hashes: np.ndarray, cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every LSH band key of each document → (band keys, the hash of the document of each key)."""
    a, b = _permutations(cfg.bands * cfg.rows)
    keys = [key for text in texts for key in band_keys(minhash_signature(text, cfg.ngram, a, b), cfg.bands)]
    return np.array(keys, dtype=np.int64), np.repeat(hashes.astype(np.int64), cfg.bands)


def band_collisions(group: dict[str, np.ndarray]) -> dict[str, Any]:
    """Within each run of equal band keys, every document but the one with the smallest hash is a near duplicate.

    The smallest hash of any group of similar documents is never marked, so each group keeps one document.
    """
    order = np.lexsort((group[HASH], group["band"]))
    band, hashes = group["band"][order], group[HASH][order]
    follower = np.zeros(len(band), dtype=bool)
    follower[1:] = (band[1:] == band[:-1]) & (hashes[1:] != hashes[:-1])
    return {HASH: np.unique(hashes[follower])}


def duplicate_reasons(hashes: np.ndarray, near: np.ndarray, exact: bool) -> np.ndarray:
    """Per document: 'near_duplicate' if its hash is in `near`, 'duplicate' for every copy after the first of a hash
    (when exact), else ''. Rows must be ordered by hash; ties (exact copies) keep their order."""
    reasons = np.full(len(hashes), "", dtype=object)
    if exact and len(hashes):
        repeat = np.zeros(len(hashes), dtype=bool)
        repeat[1:] = hashes[1:] == hashes[:-1]
        reasons[repeat] = "duplicate"
    reasons[np.isin(hashes, near)] = "near_duplicate"
    return reasons
