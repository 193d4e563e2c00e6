"""The second half of `raygpt prepare CONFIG`: tokenized documents → (split, shard) groups → deduplicated, packed
webdataset shards, one per source of each group. See `data_pipeline.prepare` for the whole pipeline.

Placement is a function of the content hash only, so every copy of a document (and every near-duplicate name) lands
in the same group, where `duplicate_reasons` decides: exact dedup is corpus-wide, across sources too (the copy of the
first source is kept). Each group then packs every source's documents into blocks of their own, written as shard
`source · num_shards + group`: a block never mixes sources, and a source's shards are consecutive (data mixtures).

The hash partition is done with plain Ray tasks (each block → one part per group; one task per group reads its
parts) rather than Ray Data's groupby: on 2 cores every groupby strategy (hash, sort, v2) cost ~5 s for 18 MB of
token ids, about as long as tokenizing 31 MB. It makes blocks × groups objects: fine up to ~10^5 (e.g. 300 blocks ×
300 shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from core.layout import DataLayout, is_uri
from data_pipeline.clean import DROP, HASH, SOURCE
from data_pipeline.dedup import duplicate_reasons
from data_pipeline.pack import is_val, pack_blocks, shard_index, token_stream
from data_pipeline.shards import write_shard


def columns(table: pa.Table) -> dict[str, np.ndarray]:
    """An Arrow block as numpy columns (binary columns become object arrays of bytes)."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _placement(hashes: np.ndarray, val: np.ndarray, num_shards: dict[str, int]) -> dict[str, np.ndarray]:
    """Split and shard of each document: functions of its content hash only."""
    shards = np.where(val, shard_index(hashes, num_shards["val"]), shard_index(hashes, num_shards["train"]))
    return {HASH: hashes, "split": np.where(val, "val", "train").astype(object), "shard": shards}


def _kept_rows(batch: dict[str, np.ndarray], num_shards: dict[str, int]) -> dict[str, Any]:
    """Tokenized rows → the kept documents with their (split, shard), in the schema `_dedup_pack_write` groups."""
    kept = batch[DROP] == ""
    return {
        **_placement(batch[HASH][kept], batch["val"][kept], num_shards),
        SOURCE: batch[SOURCE][kept].astype(np.int64),
        "ids": batch["ids"][kept],
        "text_bytes": batch["text_bytes"][kept],
        "near": np.zeros(int(kept.sum()), dtype=bool),
    }


def _near_rows(batch: dict[str, np.ndarray], val_fraction: float, num_shards: dict[str, int]) -> dict[str, Any]:
    """Near-duplicate names as rows of the tokenized schema, so they land in their document's (split, shard) group."""
    n = len(batch[HASH])
    return {
        **_placement(batch[HASH], is_val(batch[HASH], val_fraction), num_shards),
        SOURCE: np.zeros(n, dtype=np.int64),
        "ids": np.full(n, b"", dtype=object),
        "text_bytes": np.zeros(n, dtype=np.int64),
        "near": np.ones(n, dtype=bool),
    }


def _dedup_pack_write(
    group: dict[str, np.ndarray], data_dir: str, seq_len: int, eot: int, dtype: str, exact: bool, num_shards: int,
    num_sources: int,
) -> list[dict[str, Any]]:
    """All documents of one (split, shard) group → drop duplicates (the first source's copy is kept), order by hash,
    pack each source's documents and write its tar → one stats row per source with documents in the group."""
    split, shard = str(group["split"][0]), int(group["shard"][0])
    near = group["near"]
    hashes, sources = group[HASH][~near], group[SOURCE][~near]
    order = np.lexsort((sources, hashes))  # by hash, copies by source: which copy is kept does not depend on timing
    hashes, sources = hashes[order], sources[order]
    ids, text_bytes = group["ids"][~near][order], group["text_bytes"][~near][order]
    reasons = duplicate_reasons(hashes, group[HASH][near], exact)
    rows = []
    for source in range(num_sources):
        mine = sources == source
        if not mine.any():
            continue
        keep = mine & (reasons == "")
        number = source * num_shards + shard
        docs = [np.frombuffer(b, dtype=dtype) for b in ids[keep]]
        blocks, tail = pack_blocks(token_stream(docs, eot, np.dtype(dtype)), seq_len + 1)
        name = DataLayout.shard_name(split, number)
        path = DataLayout(data_dir if is_uri(data_dir) else Path(data_dir)).shard(split, number)
        digest, size, index = write_shard(path, blocks, f"{split}-{number:06d}") if len(blocks) else ("", 0, "")
        rows.append({
            "split": split,
            "shard": number,
            SOURCE: source,
            "file": name if len(blocks) else "",
            "sequences": len(blocks),
            "tokens": blocks.size,
            "tail_tokens": tail,
            "documents": len(docs),
            "doc_tokens": sum(len(d) for d in docs),
            "text_bytes": int(text_bytes[keep].sum()),
            "bytes": size,
            "sha256": digest,
            "index_sha256": index,
        })
        for reason in ("duplicate", "near_duplicate"):
            dropped = mine & (reasons == reason)
            rows[-1].update({reason: int(dropped.sum()), f"{reason}_bytes": int(text_bytes[dropped].sum())})
    return rows


@ray.remote
def _partition_block(
    table: pa.Table, near: bool, num_shards: dict[str, int], val_fraction: float
) -> list[dict[str, np.ndarray]]:
    """Map side of the hash partition: one block of tokenized documents (or of near-duplicate names) → one part per
    (split, shard) group, train shards first (each split has ≥ 1 shard, so there are ≥ 2 parts: a list of refs).
    The groups are functions of the content hash only."""
    batch = columns(table)
    rows = _near_rows(batch, val_fraction, num_shards) if near else _kept_rows(batch, num_shards)
    group = np.where(rows["split"] == "val", num_shards["train"] + rows["shard"], rows["shard"])
    return [{k: v[group == g] for k, v in rows.items()} for g in range(num_shards["train"] + num_shards["val"])]


@ray.remote
def _write_group(pack: dict[str, Any], *parts: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Reduce side: every part of one (split, shard) group → its tars and stats rows (none for an empty group)."""
    group = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if not len(group[HASH]):
        return []
    return _dedup_pack_write(group, **pack)


def write_shards(
    token_blocks: list[ray.ObjectRef], near_blocks: list[ray.ObjectRef], num_shards: dict[str, int],
    val_fraction: float, pack: dict[str, Any],
) -> list[dict[str, Any]]:
    """Partition the tokenized blocks (and near-duplicate names) by (split, shard), then dedup, pack and write every
    non-empty group as one tar per source (`pack`: data_dir, seq_len, eot, dtype, exact, num_sources) → one stats row
    per (group, source)."""
    groups = num_shards["train"] + num_shards["val"]
    blocks = [(ref, False) for ref in token_blocks] + [(ref, True) for ref in near_blocks]
    parts = [_partition_block.options(num_returns=groups).remote(ref, near, num_shards, val_fraction) for ref, near in blocks]
    split_shards = [num_shards["train"]] * num_shards["train"] + [num_shards["val"]] * num_shards["val"]
    written = ray.get([_write_group.remote({**pack, "num_shards": split_shards[g]}, *[p[g] for p in parts])
                       for g in range(groups)])
    return [row for rows in written for row in rows]
