"""Train/val split, shard assignment and packing of tokenized documents into fixed-size blocks: pure numpy.

Run inside Ray Data by `raygpt prepare CONFIG` (see `data_pipeline.prepare`); unit-tested without Ray.
Each document goes to train or val by content hash; a unit's documents of a split, in the unit's order, are joined
by the end-of-text token (one after every document) and cut into non-overlapping blocks of seq_len + 1 ids. The last
partial block of each unit's split (fewer than seq_len + 1 ids) is dropped and counted as `tail_tokens`.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.clean import unit_interval

_SPLIT_SALT, _SAMPLE_SALT = 1, 3  # 2 was the shard's (format 4); 4 and 5 are the dedup buckets'


def is_val(hashes: np.ndarray, val_fraction: float) -> np.ndarray:
    """Deterministic split by content hash: True where the document goes to val."""
    return unit_interval(hashes, _SPLIT_SALT) < val_fraction


def in_sample(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic sample of documents (e.g. for tokenizer training), independent of the split."""
    return unit_interval(hashes, _SAMPLE_SALT) < fraction


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (DESIGN.md shard contract)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tar_bytes_per_block(block_len: int, dtype: np.dtype) -> int:
    """Bytes one block takes in a tar: a 512-byte member header plus the .npy (128-byte header + data), 512-padded."""
    return 512 + -(-(128 + block_len * dtype.itemsize) // 512) * 512


def token_stream(docs: list[np.ndarray], eot_id: int, dtype: np.dtype) -> np.ndarray:
    """Documents joined in order, an end-of-text id after each: doc0 EOT doc1 EOT ..."""
    eot = np.array([eot_id], dtype=dtype)
    parts = [part for doc in docs for part in (doc.astype(dtype, copy=False), eot)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def pack_blocks(stream: np.ndarray, block_len: int) -> tuple[np.ndarray, int]:
    """Cut a token stream into non-overlapping rows of block_len → (blocks (n, block_len), tail tokens dropped)."""
    n = len(stream) // block_len
    return stream[: n * block_len].reshape(n, block_len), len(stream) - n * block_len
