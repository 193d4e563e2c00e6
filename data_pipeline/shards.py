"""Webdataset shard writing: deterministic bytes, written atomically to a local folder or object storage
(`cluster.storage.output`).

Run inside Ray tasks by `raygpt prepare CONFIG` (data_pipeline/partition.py). Each tar sample is one packed block
stored as `<key>.input_ids.npy`, which plain `webdataset` decodes back to a numpy array.
"""

from __future__ import annotations

import hashlib

import numpy as np
import webdataset as wds

from cluster import storage
from cluster.layout import Location


class _Hashing:
    """A write-only file wrapper that hashes what passes through (the tar is hashed as it is written, not re-read)."""

    def __init__(self, f) -> None:  # noqa: ANN001
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_shard(path: Location, blocks: np.ndarray, key_prefix: str) -> tuple[str, int]:
    """Write blocks (n, seq_len + 1) as one tar; fixed mtime/owner make the bytes reproducible. Returns its sha256 and
    size in bytes."""
    with storage.output(path) as f:
        sink = _Hashing(f)
        with wds.TarWriter(sink, user="raygpt", group="raygpt", mtime=0) as tar:
            for i, block in enumerate(blocks):
                tar.write({"__key__": f"{key_prefix}-{i:07d}", "input_ids.npy": block})
    return sink.digest.hexdigest(), sink.size
