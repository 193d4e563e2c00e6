"""Deduplication: MinHash/LSH pieces without Ray, then the hash-partitioned passes on the session's local Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from data_pipeline.clean import doc_hash
from data_pipeline.config import CleanConfig, DataConfig, SourceConfig
from data_pipeline.dedup import _permutations, band_collisions, band_keys, duplicate_reasons, minhash_signature
from data_pipeline.passes import DROPS, REASONS, bucket_parts, dup_bucket, near_bucket, read_bucket, survey_unit, work_path
from data_pipeline.sources import resolve_sources
from data_pipeline.units import cut_units

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


def test_copies_and_near_copies_meet_across_units_and_buckets(tmp_path: Path, ray_session: None) -> None:
    """The passes' bucket tasks on real Ray: documents in ≥ 6 units, hashes in 3 buckets, band keys in 5 — every exact
    copy after the first (by unit) and the larger hash of each near pair is on a drop list, and nothing else."""
    distinct = [" ".join(f"d{k}w{j}" for j in range(200)) for k in range(40)]
    texts = distinct + [distinct[7].replace("d7w100", "changed"), distinct[9] + " extra words at the end"]
    texts += [distinct[3], distinct[3], "", "short"]  # two exact copies; dropped rows are ignored
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(texts):
        (corpus / f"{i:03d}.txt").write_text(text)
    cfg = DataConfig(sources=[SourceConfig(path=str(corpus))], clean=CleanConfig(min_chars=10, minhash={"enabled": True}),
                     unit_bytes=8_000)
    units = cut_units(resolve_sources(cfg.sources), cfg.sources, cfg.unit_bytes)
    assert len(units) >= 6 and [u.id for u in units] == list(range(len(units)))
    root, buckets = str(tmp_path / "data"), {"hash": 3, "band": 5}
    surveys = ray.get([ray.remote(survey_unit).remote(u, cfg.sources[0], cfg, root, buckets, 0.0) for u in units])
    bands = bucket_parts(surveys, "bands", buckets["band"])
    near = ray.get([ray.remote(near_bucket).remote(root, bands[b], b, buckets["hash"]) for b in range(buckets["band"])])
    hashes = bucket_parts(surveys, "hashes", buckets["hash"])
    dups = ray.get([ray.remote(dup_bucket).remote(root, hashes[b], [(n["bucket"], n["index"][str(b)]) for n in near
                                                         if str(b) in n["index"]], b, True, len(units))
                    for b in range(buckets["hash"])])
    assert sum(n["near"] for n in near) >= 2 and sum(d["dropped"] for d in dups) == 4  # a near pair shares ≥ 1 band

    dropped: dict[str, str] = {}  # text → reason, read back through each unit's drop list
    for unit in units:
        lists = [read_bucket(work_path(root, f"dups/bucket-{d['bucket']:06d}.arrow"), d["index"].get(str(unit.id), []),
                             DROPS) for d in dups]
        positions = {p: r for t in lists for p, r in zip(t.column("pos").to_pylist(), t.column("reason").to_pylist())}
        docs = [p.read_text() for p in map(Path, (piece.path for piece in unit.pieces))]  # one document per file
        dropped.update({docs[p]: REASONS[r] for p, r in positions.items()})
    pairs = [(distinct[7], texts[40]), (distinct[9], texts[41])]
    assert dropped == {**{max(pair, key=doc_hash): "near_duplicate" for pair in pairs},
                       distinct[3]: "duplicate"}  # the copies in later units: both of distinct[3]'s copies
