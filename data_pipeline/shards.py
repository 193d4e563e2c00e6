"""Webdataset shard writing: deterministic bytes, written atomically to a local folder or object storage
(`core.files.output`).

Run inside Ray tasks by `raygpt prepare CONFIG` (data_pipeline/partition.py). Each tar sample is one packed block
stored as `<key>.input_ids.npy`, which plain `webdataset` decodes back to a numpy array. Every block takes the same
number of tar bytes (`pack.tar_bytes_per_block`), so block i starts at byte i·S; beside each tar, its block index
`<shard>.idx` holds an 8-byte blake2b digest of each block's S bytes, so that a reader that fetches single blocks
(the training reader, `trainer.data`) can check each one (the manifest holds the index's sha256).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import webdataset as wds

from core import files
from core.layout import Location
from data_pipeline.pack import tar_bytes_per_block


BLOCK_DIGEST = 8
"""Bytes of each block's blake2b digest in a block index."""


def block_digest(raw: bytes | memoryview) -> bytes:
    return hashlib.blake2b(raw, digest_size=BLOCK_DIGEST).digest()


def index_name(shard: str) -> str:
    """The block index beside a shard: shard-000003.tar → shard-000003.idx."""
    return shard.removesuffix(".tar") + ".idx"


class WrittenShard(NamedTuple):
    sha256: str
    bytes: int
    index_sha256: str


class _Hashing:
    """A write-only file wrapper that hashes what passes through (the tar is hashed as it is written, not re-read):
    the whole stream, and each consecutive `stride` bytes (the blocks; the tail after them is the tar's end padding)."""

    def __init__(self, f, stride: int) -> None:  # noqa: ANN001
        self.f, self.digest, self.size, self.stride = f, hashlib.sha256(), 0, stride
        self.pending, self.blocks = bytearray(), bytearray()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        self.pending += data
        while len(self.pending) >= self.stride:
            self.blocks += block_digest(memoryview(self.pending)[: self.stride])
            del self.pending[: self.stride]
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_shard(path: Location, blocks: np.ndarray, key_prefix: str) -> WrittenShard:
    """Write blocks (n, seq_len + 1) as one tar, then its block index; fixed mtime/owner make the bytes reproducible.
    Returns the tar's sha256 and size and the index's sha256."""
    stride = tar_bytes_per_block(blocks.shape[1], blocks.dtype)
    with files.output(path) as f:
        sink = _Hashing(f, stride)
        with wds.TarWriter(sink, user="raygpt", group="raygpt", mtime=0) as tar:
            for i, block in enumerate(blocks):
                tar.write({"__key__": f"{key_prefix}-{i:07d}", "input_ids.npy": block})
    index = bytes(sink.blocks[: len(blocks) * BLOCK_DIGEST])
    if len(index) != len(blocks) * BLOCK_DIGEST:
        raise ValueError(f"{path}: blocks do not take {stride} tar bytes each (a key of over 100 characters?)")
    files.atomic_write(index_name(str(path)), index)
    return WrittenShard(sink.digest.hexdigest(), sink.size, hashlib.sha256(index).hexdigest())
