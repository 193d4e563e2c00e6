"""Webdataset shard writing: deterministic bytes, written atomically to a local folder or object storage
(`core.files.output`).

Run inside Ray tasks by `raygpt prepare CONFIG` (data_pipeline/passes.py). Each tar sample is one packed block
stored as `<key>.input_ids.npy`, which plain `webdataset` decodes back to a numpy array. Every block takes the same
number of tar bytes (`pack.tar_bytes_per_block`), so block i starts at byte i·S; beside each tar, its block index
`<shard>.idx` holds an 8-byte blake2b digest of each block's S bytes, so that a reader that fetches single blocks
(the training reader, `trainer.data`) can check each one (the manifest holds the index's sha256).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import NamedTuple

import numpy as np
import webdataset as wds

from typing import Any

from core import files
from core.layout import DataLayout, Location, join
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


class ShardWriter:
    """One tar written a batch of blocks at a time (a unit's blocks are never all in memory): deterministic bytes, the
    tar hashed and its block index built as it is written, published atomically by `close` (`core.files.output`)."""

    def __init__(self, path: Location, key_prefix: str, block_len: int, dtype: np.dtype, sample_key: str = "input_ids.npy",
                 rows: int = 1) -> None:
        """`rows`: 1 for token blocks (block_len,), 2 for chat blocks (2, block_len) of ids and loss mask."""
        self.path, self.key_prefix, self.blocks, self.sample_key = path, key_prefix, 0, sample_key
        self.stride = tar_bytes_per_block(rows * block_len, dtype)
        self._stack = contextlib.ExitStack()
        self._sink = _Hashing(self._stack.enter_context(files.output(path)), self.stride)
        self._tar = self._stack.enter_context(wds.TarWriter(self._sink, user="raygpt", group="raygpt", mtime=0))

    def write(self, blocks: np.ndarray) -> None:
        for block in blocks:
            self._tar.write({"__key__": f"{self.key_prefix}-{self.blocks:07d}", self.sample_key: block})
            self.blocks += 1

    def close(self) -> WrittenShard:
        """Finish the tar (it appears under its name only now), then write its block index beside it."""
        self._stack.close()
        index = bytes(self._sink.blocks[: self.blocks * BLOCK_DIGEST])
        if len(index) != self.blocks * BLOCK_DIGEST:
            raise ValueError(f"{self.path}: blocks do not take {self.stride} tar bytes each (a key of over 100 characters?)")
        files.atomic_write(index_name(str(self.path)), index)
        return WrittenShard(self._sink.digest.hexdigest(), self._sink.size, hashlib.sha256(index).hexdigest())

    def abandon(self) -> None:
        """Drop a tar that is not finished (nothing is published)."""
        self._stack.__exit__(RuntimeError, RuntimeError("abandoned"), None)


class SplitWriter:
    """One split of one unit's blocks, written to tars of at most `shard_bytes` (consecutive numbers
    `shard-UUUUUU-PPPP`); the block-making (`add`) is the subclass's: token streams (`data_pipeline.passes`) or
    packed conversations (`data_pipeline.chat_data`)."""

    sample_key, rows = "input_ids.npy", 1

    def __init__(self, data_dir: Location, split: str, unit: int, block_len: int, dtype: np.dtype, shard_bytes: int):
        self.data_dir, self.split, self.unit, self.block_len, self.dtype = data_dir, split, unit, block_len, dtype
        self.per_tar = max(1, shard_bytes // tar_bytes_per_block(self.rows * block_len, dtype))
        self.writer: ShardWriter | None = None
        self.shards: list[dict[str, Any]] = []
        self.totals = {"documents": 0, "doc_tokens": 0, "text_bytes": 0, "sequences": 0, "tokens": 0}

    def write_blocks(self, blocks: np.ndarray) -> None:
        """Append blocks (n, block_len) — (n, 2, block_len) for chat — opening a new tar whenever one is full."""
        while len(blocks):
            if self.writer is None:
                number = len(self.shards)
                self.file = DataLayout.shard_name(self.split, self.unit, number)
                self.writer = ShardWriter(join(self.data_dir, self.file), f"{self.split}-{self.unit:06d}-{number:04d}",
                                          self.block_len, self.dtype, self.sample_key, self.rows)
            room = self.per_tar - self.writer.blocks
            self.writer.write(blocks[:room])
            blocks = blocks[room:]
            if self.writer.blocks == self.per_tar:
                self._close()

    def _close(self) -> None:
        assert self.writer is not None
        blocks = self.writer.blocks
        digest, size, index = self.writer.close()
        self.shards.append({"file": self.file, "sequences": blocks, "tokens": blocks * self.block_len, "bytes": size,
                            "sha256": digest, "index_sha256": index})
        self.totals["sequences"] += blocks
        self.totals["tokens"] += blocks * self.block_len
        self.writer = None

    def tail(self) -> dict[str, Any]:
        """Called once at the end, before the last tar closes: write what is pending; → the subclass's counts."""
        return {"tail_tokens": 0}

    def finish(self) -> dict[str, Any]:
        rest = self.tail()
        if self.writer is not None:
            self._close()
        return {**self.totals, **rest, "shards": self.shards}

    def abandon(self) -> None:
        if self.writer is not None:
            self.writer.abandon()


def write_shard(path: Location, blocks: np.ndarray, key_prefix: str) -> WrittenShard:
    """Write blocks (n, seq_len + 1) as one tar, then its block index; fixed mtime/owner make the bytes reproducible.
    Returns the tar's sha256 and size and the index's sha256."""
    writer = ShardWriter(path, key_prefix, blocks.shape[1], blocks.dtype)
    writer.write(blocks)
    return writer.close()
