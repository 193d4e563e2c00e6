"""Unit tests of splitting, shard assignment, packing and shard writing (no Ray)."""

from __future__ import annotations

import numpy as np
import webdataset as wds

from core.files import sha256
from data_pipeline.clean import doc_hash
from data_pipeline.pack import is_val, pack_blocks, tar_bytes_per_block, token_dtype, token_stream
from data_pipeline.shards import block_digest, write_shard

HASHES = np.array([doc_hash(f"doc {i}") for i in range(10_000)], dtype=np.int64)


def test_token_stream_puts_eot_after_every_document() -> None:
    docs = [np.array([5, 6], dtype=np.uint16), np.array([], dtype=np.uint16), np.array([7], dtype=np.uint16)]
    assert token_stream(docs, 0, np.dtype(np.uint16)).tolist() == [5, 6, 0, 0, 7, 0]
    assert token_stream([], 0, np.dtype(np.uint16)).size == 0


def test_pack_blocks_cuts_without_overlap_and_counts_tail() -> None:
    stream = np.arange(23, dtype=np.uint32)
    blocks, tail = pack_blocks(stream, 5)
    assert blocks.shape == (4, 5) and tail == 3
    assert blocks.reshape(-1).tolist() == list(range(20))
    assert pack_blocks(np.arange(4), 5)[0].shape == (0, 5)


def test_split_is_deterministic_and_near_the_fraction() -> None:
    val = is_val(HASHES, 0.1)
    assert (val == is_val(HASHES.copy(), 0.1)).all()
    assert 0.09 < val.mean() < 0.11
    assert not is_val(HASHES, 0.0).any()


def test_token_dtype_follows_the_vocabulary() -> None:
    assert token_dtype(50_257) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


def test_write_shard_is_reproducible_and_readable_by_webdataset(tmp_path) -> None:
    blocks = np.arange(3 * 9, dtype=np.uint16).reshape(3, 9)
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    digest, size, index = write_shard(first, blocks, "train-000000")
    assert write_shard(second, blocks, "train-000000") == (digest, first.stat().st_size, index)
    assert digest == sha256(first) and size == first.stat().st_size
    stride = tar_bytes_per_block(9, np.dtype(np.uint16))  # the block index: a digest of each block's tar bytes
    raw = first.read_bytes()
    assert (tmp_path / "a.idx").read_bytes() == b"".join(block_digest(raw[i * stride : (i + 1) * stride]) for i in range(3))
    assert index == sha256(tmp_path / "a.idx")
    assert first.read_bytes() == second.read_bytes()
    samples = list(wds.WebDataset(str(first), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"train-000000-{i:07d}" for i in range(3)]
    for sample, block in zip(samples, blocks):
        assert sample["input_ids.npy"].dtype == np.uint16
        assert (sample["input_ids.npy"] == block).all()
    assert not list(tmp_path.glob("*.tmp"))


def test_tar_size_estimate_matches_written_members(tmp_path) -> None:
    blocks = np.zeros((50, 257), dtype=np.uint16)
    write_shard(tmp_path / "s.tar", blocks, "k")
    size = (tmp_path / "s.tar").stat().st_size
    per_block = tar_bytes_per_block(257, np.dtype(np.uint16))
    assert 50 * per_block <= size <= 50 * per_block + 10240  # plus the end-of-archive record padding
