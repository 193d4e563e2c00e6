"""Deduplication: MinHash/LSH pieces without Ray, then the hash-partitioned passes on the session's local Ray."""

from __future__ import annotations

import numpy as np
import ray.data

from data_pipeline.clean import clean_batch, doc_hash, documents_batch
from data_pipeline.config import CleanConfig, MinHashConfig
from data_pipeline.dedup import (
    _permutations,
    band_collisions,
    band_keys,
    duplicate_reasons,
    minhash_signature,
    near_duplicates,
)

WORDS = " ".join(f"word{i}" for i in range(300))


def _similarity(x: str, y: str) -> float:
    a, b = _permutations(128)
    return float((minhash_signature(x, 5, a, b) == minhash_signature(y, 5, a, b)).mean())


def test_minhash_estimates_jaccard_similarity() -> None:
    near = WORDS.replace("word150", "changed")  # one word changed: 5 of ~296 shingles differ
    other = " ".join(f"other{i}" for i in range(300))
    assert _similarity(WORDS, WORDS) == 1.0
    assert _similarity(WORDS, near) > 0.9
    assert _similarity(WORDS, other) < 0.05


def test_near_duplicates_share_a_band_and_all_but_one_are_marked() -> None:
    a, b = _permutations(16 * 8)
    docs = [WORDS, WORDS.replace("word150", "changed"), " ".join(f"other{i}" for i in range(300))]
    hashes = [doc_hash(d) for d in docs]
    keys, owners = [], []
    for doc, h in zip(docs, hashes):
        for key in band_keys(minhash_signature(doc, 5, a, b), 16):
            keys.append(key)
            owners.append(h)
    marked = band_collisions({"band": np.array(keys), "hash": np.array(owners)})["hash"].tolist()
    assert marked == [max(hashes[0], hashes[1])]


def test_duplicate_reasons_keeps_the_first_copy() -> None:
    hashes = np.array([1, 1, 1, 2, 3, 3], dtype=np.int64)
    assert duplicate_reasons(hashes, np.array([3]), exact=True).tolist() == [
        "", "duplicate", "duplicate", "", "near_duplicate", "near_duplicate"
    ]
    assert duplicate_reasons(hashes, np.array([], dtype=np.int64), exact=False).tolist() == [""] * 6


def test_near_duplicates_on_ray_across_blocks(ray_session: None) -> None:
    distinct = [" ".join(f"d{k}w{j}" for j in range(200)) for k in range(40)]
    texts = distinct + [distinct[7].replace("d7w100", "changed"), distinct[9] + " extra words at the end"]
    texts += ["", "short"]  # dropped rows are ignored
    raw = {"bytes": np.array([t.encode() for t in texts], dtype=object)}
    docs = clean_batch(documents_batch(raw, 0, "file", "replace"), CleanConfig(min_chars=10))
    ds = ray.data.from_items([{k: v[i] for k, v in docs.items()} for i in range(len(texts))]).repartition(8)
    marked = sorted({r["hash"] for r in near_duplicates(ds, MinHashConfig(enabled=True), buckets=4).take_all()})  # one row per band hit
    pairs = [(doc_hash(distinct[7]), doc_hash(texts[40])), (doc_hash(distinct[9]), doc_hash(texts[41]))]
    assert marked == sorted(max(pair) for pair in pairs)  # the larger hash of each similar pair goes
