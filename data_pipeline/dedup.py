"""Corpus-wide deduplication in Ray Data: exact (content hash) and near-duplicate (MinHash + LSH) removal.

Run by `raygpt prepare CONFIG` (see `data_pipeline.prepare`). Both are hash-partitioned, so no driver-side loop over
documents is needed:
  - near duplicates: LSH band keys are grouped by a bucket of the key, so all documents sharing a band meet in one
    `map_groups` call, which names every one but the smallest hash as a near duplicate;
  - exact duplicates: documents are assigned to shards by content hash, so all copies of a document (and the near-
    duplicate names) meet in the `map_groups` call that writes their shard, where `duplicate_reasons` decides.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import numpy as np
import ray.data

from data_pipeline.clean import DROP, HASH, TEXT
from data_pipeline.config import MinHashConfig

BUCKET = "bucket"
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


def _band_rows(batch: dict[str, np.ndarray], cfg: MinHashConfig, buckets: int) -> dict[str, Any]:
    a, b = _permutations(cfg.bands * cfg.rows)
    keys: list[int] = []
    hashes: list[int] = []
    kept = batch[DROP] == ""
    for text, h in zip(batch[TEXT][kept], batch[HASH][kept]):
        for key in band_keys(minhash_signature(text, cfg.ngram, a, b), cfg.bands):
            keys.append(key)
            hashes.append(int(h))
    band = np.array(keys, dtype=np.int64)
    return {"band": band, HASH: np.array(hashes, dtype=np.int64), BUCKET: band % buckets}


def band_collisions(group: dict[str, np.ndarray]) -> dict[str, Any]:
    """Within each run of equal band keys, every document but the one with the smallest hash is a near duplicate.

    The smallest hash of any group of similar documents is never marked, so each group keeps one document.
    """
    order = np.lexsort((group[HASH], group["band"]))
    band, hashes = group["band"][order], group[HASH][order]
    follower = np.zeros(len(band), dtype=bool)
    follower[1:] = (band[1:] == band[:-1]) & (hashes[1:] != hashes[:-1])
    return {HASH: np.unique(hashes[follower])}


def near_duplicates(docs: ray.data.Dataset, cfg: MinHashConfig, buckets: int) -> ray.data.Dataset:
    """Hashes (column `hash`) of the kept documents that near-duplicate a document of smaller hash."""
    return (
        docs.map_batches(_band_rows, fn_kwargs={"cfg": cfg, "buckets": buckets}, batch_format="numpy")
        .groupby(BUCKET, num_partitions=buckets)
        .map_groups(band_collisions, batch_format="numpy")
    )


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
