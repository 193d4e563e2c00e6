"""Deduplication: MinHash/LSH pieces without Ray, then the hash-partitioned passes on the session's local Ray."""

from __future__ import annotations

import numpy as np
import ray.data

from data_pipeline.clean import clean_batch, doc_hash, documents_batch
from data_pipeline.config import CleanConfig, MinHashConfig
from data_pipeline.dedup import _permutations, band_collisions, band_keys, dedup_group, deduplicate, minhash_signature

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


def test_dedup_group_marks_exact_and_near_duplicates() -> None:
    group = {
        "text": np.array(["a", "b", "a", "c", ""], dtype=object),
        "hash": np.array([1, 2, 1, 3, 3], dtype=np.int64),
        "drop": np.array(["", "", "", "", "near_duplicate_marker"], dtype=object),
        "bucket": np.zeros(5, dtype=np.int64),
    }
    out = dedup_group(group, exact=True)
    assert out["drop"].tolist() == ["", "", "duplicate", "near_duplicate"]
    assert out["text"].tolist() == ["a", "b", "", ""] and "bucket" not in out
    assert dedup_group(group, exact=False)["drop"].tolist() == ["", "", "", "near_duplicate"]


def test_deduplicate_on_ray_across_blocks(ray_session: None) -> None:
    distinct = [" ".join(f"d{k}w{j}" for j in range(200)) for k in range(40)]
    texts = [distinct[i % 40] for i in range(100)]  # 40 distinct documents and 60 exact copies
    texts.append(distinct[7].replace("d7w100", "changed"))  # a near duplicate of one of them
    raw = {"bytes": np.array([t.encode() for t in texts], dtype=object)}
    docs = clean_batch(documents_batch(raw, 0, "file", "replace"), CleanConfig())
    ds = ray.data.from_items([{k: v[i] for k, v in docs.items()} for i in range(len(texts))]).repartition(8)

    exact = deduplicate(ds, CleanConfig(), buckets=4).take_all()
    assert len(exact) == 101 and [r["drop"] for r in exact].count("duplicate") == 60
    assert sum(not r["drop"] for r in exact) == 41

    near = deduplicate(ds, CleanConfig(minhash=MinHashConfig(enabled=True)), buckets=4).take_all()
    kept = [r["text"] for r in near if not r["drop"]]
    assert len(near) == 101 and len(kept) == 40  # one of the near pair goes, with all its exact copies
    assert {r["drop"] for r in near} == {"", "duplicate", "near_duplicate"}
    assert len(set(kept)) == 40 and sum(t in distinct for t in kept) >= 39
    assert all(r["text"] == "" for r in near if r["drop"])
