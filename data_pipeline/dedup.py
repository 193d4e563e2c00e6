"""Corpus-wide deduplication in Ray Data: exact (content hash) and near-duplicate (MinHash + LSH) removal.

Run by `raygpt prepare CONFIG` (see `data_pipeline.prepare`). Both are hash-partitioned: rows are grouped by a bucket
of their key, so all copies of a document (or all members of an LSH band bucket) meet in one `map_groups` call and
no driver-side loop over documents is needed. Dropped documents keep their row with a reason in `drop`.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import numpy as np
import ray.data

from data_pipeline.clean import DROP, HASH, NBYTES, REPLACED, SOURCE, TEXT
from data_pipeline.config import CleanConfig, MinHashConfig

BUCKET = "bucket"
_MARKER = "near_duplicate_marker"  # a row that only says "the document with this hash is a near duplicate"
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
    for text, h in zip(batch[TEXT], batch[HASH]):
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


def _as_markers(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    n = len(batch[HASH])
    return {
        TEXT: np.full(n, "", dtype=object),
        SOURCE: np.full(n, -1, dtype=np.int32),
        NBYTES: np.zeros(n, dtype=np.int64),
        DROP: np.full(n, _MARKER, dtype=object),
        REPLACED: np.zeros(n, dtype=bool),
        HASH: batch[HASH],
    }


def dedup_group(group: dict[str, np.ndarray], exact: bool) -> dict[str, Any]:
    """All rows of one hash bucket → the same rows with near (and, if exact, exact) duplicates marked, markers removed."""
    drops = group[DROP].copy()
    hashes = group[HASH]
    near = set(hashes[drops == _MARKER].tolist())
    seen: set[int] = set()
    for i in np.argsort(hashes, kind="stable"):
        if drops[i]:
            continue
        h = int(hashes[i])
        if h in near:
            drops[i] = "near_duplicate"
        elif exact and h in seen:
            drops[i] = "duplicate"
        else:
            seen.add(h)
    keep = drops != _MARKER
    out = {k: v[keep] for k, v in group.items() if k != BUCKET}
    out[DROP] = drops[keep]
    out[TEXT] = np.where(out[DROP] == "", out[TEXT], "").astype(object)  # dropped rows carry no text
    return out


def deduplicate(docs: ray.data.Dataset, cfg: CleanConfig, buckets: int) -> ray.data.Dataset:
    """Mark exact and (optionally) near duplicates across the whole corpus; rows are kept, with reasons in `drop`."""
    if not cfg.dedup and not cfg.minhash.enabled:
        return docs
    if cfg.minhash.enabled:
        from ray.data.expressions import col

        docs = docs.materialize()  # read twice: for signatures and for the dedup pass
        markers = (
            docs.filter(expr=col(DROP) == "")
            .map_batches(_band_rows, fn_kwargs={"cfg": cfg.minhash, "buckets": buckets}, batch_format="numpy")
            .groupby(BUCKET, num_partitions=buckets)
            .map_groups(band_collisions, batch_format="numpy")
            .map_batches(_as_markers, batch_format="numpy")
        )
        docs = docs.union(markers)
    with_bucket = docs.map_batches(lambda b: {**b, BUCKET: b[HASH] % buckets}, batch_format="numpy")
    return with_bucket.groupby(BUCKET, num_partitions=buckets).map_groups(dedup_group, fn_kwargs={"exact": cfg.dedup}, batch_format="numpy")
