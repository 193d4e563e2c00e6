"""The second half of `raygpt prepare CONFIG`: tokenized documents → (split, shard) groups → deduplicated, packed
webdataset shards. See `data_pipeline.prepare` for the whole pipeline.

Placement is a function of the content hash only, so every copy of a document (and every near-duplicate name) lands
in the same group, where `duplicate_reasons` decides: exact dedup is corpus-wide. The hash partition is done with
plain Ray tasks (each block → one part per group; one task per group reads its parts) rather than Ray Data's
groupby: on 2 cores every groupby strategy (hash, sort, v2) cost ~5 s for 18 MB of token ids, about as long as
tokenizing 31 MB. It makes blocks × groups objects: fine up to ~10^5 (e.g. 300 blocks × 300 shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from core.layout import DataLayout, is_uri
from data_pipeline.clean import DROP, HASH
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
        "ids": batch["ids"][kept],
        "text_bytes": batch["text_bytes"][kept],
        "near": np.zeros(int(kept.sum()), dtype=bool),
    }


def _near_rows(batch: dict[str, np.ndarray], val_fraction: float, num_shards: dict[str, int]) -> dict[str, Any]:
    """Near-duplicate names as rows of the tokenized schema, so they land in their document's (split, shard) group."""
    n = len(batch[HASH])
    return {
        **_placement(batch[HASH], is_val(batch[HASH], val_fraction), num_shards),
        "ids": np.full(n, b"", dtype=object),
        "text_bytes": np.zeros(n, dtype=np.int64),
        "near": np.ones(n, dtype=bool),
    }


def _dedup_pack_write(
    group: dict[str, np.ndarray], data_dir: str, seq_len: int, eot: int, dtype: str, exact: bool
) -> dict[str, Any]:
    """All documents of one (split, shard) → drop duplicates, order by hash, pack, write one tar → its stats row."""
    split, shard = str(group["split"][0]), int(group["shard"][0])
    near = group["near"]
    hashes, ids, text_bytes = group[HASH][~near], group["ids"][~near], group["text_bytes"][~near]
    order = np.argsort(hashes, kind="stable")
    hashes, ids, text_bytes = hashes[order], ids[order], text_bytes[order]
    reasons = duplicate_reasons(hashes, group[HASH][near], exact)
    keep = reasons == ""
    docs = [np.frombuffer(b, dtype=dtype) for b in ids[keep]]
    blocks, tail = pack_blocks(token_stream(docs, eot, np.dtype(dtype)), seq_len + 1)
    name = DataLayout.shard_name(split, shard)
    path = DataLayout(data_dir if is_uri(data_dir) else Path(data_dir)).shard(split, shard)
    digest, size, index = write_shard(path, blocks, f"{split}-{shard:06d}") if len(blocks) else ("", 0, "")
    return {
        "split": [split],
        "shard": [shard],
        "file": [name if len(blocks) else ""],
        "sequences": [len(blocks)],
        "tokens": [blocks.size],
        "tail_tokens": [tail],
        "documents": [len(docs)],
        "doc_tokens": [sum(len(d) for d in docs)],
        "text_bytes": [int(text_bytes[keep].sum())],
        "bytes": [size],
        "sha256": [digest],
        "index_sha256": [index],
        "duplicate": [int((reasons == "duplicate").sum())],
        "duplicate_bytes": [int(text_bytes[reasons == "duplicate"].sum())],
        "near_duplicate": [int((reasons == "near_duplicate").sum())],
        "near_duplicate_bytes": [int(text_bytes[reasons == "near_duplicate"].sum())],
    }


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
def _write_group(pack: dict[str, Any], *parts: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Reduce side: every part of one (split, shard) group → its tar and stats row (None for an empty group)."""
    group = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if not len(group[HASH]):
        return None
    return {k: v[0] for k, v in _dedup_pack_write(group, **pack).items()}


def write_shards(
    token_blocks: list[ray.ObjectRef], near_blocks: list[ray.ObjectRef], num_shards: dict[str, int],
    val_fraction: float, pack: dict[str, Any],
) -> list[dict[str, Any]]:
    """Partition the tokenized blocks (and near-duplicate names) by (split, shard), then dedup, pack and write every
    non-empty group as one tar (`pack`: data_dir, seq_len, eot, dtype, exact) → one stats row per written shard."""
    groups = num_shards["train"] + num_shards["val"]
    blocks = [(ref, False) for ref in token_blocks] + [(ref, True) for ref in near_blocks]
    parts = [_partition_block.options(num_returns=groups).remote(ref, near, num_shards, val_fraction) for ref, near in blocks]
    rows = ray.get([_write_group.remote(pack, *[p[g] for p in parts]) for g in range(groups)])
    return [row for row in rows if row is not None]
