"""trainer/data.py without Ray: the global batch order is a pure function of (seed, step) — the same at every world
size and after a resume at any step with another world size, every sample once per epoch — and the reader returns
exactly the blocks prepare wrote, from local disk or a bucket, refusing any block whose bytes differ."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from core import files
from data_pipeline.config import DataError
from data_pipeline.shards import write_shard
from tests.conftest import bucket_copy
from trainer.data import SampleOrder, SampleReader, even_world_sizes, grad_accum, rank_steps, read_ahead, val_ids

SIZES = [3, 4, 5, 6, 2, 7]  # 27 train samples in 6 shards of different sizes


def hand_made_data(tmp_path: Path, shard_sizes: list[int], vocab: int = 100, trainable: bool = False,
                   sources: list[str] | None = None) -> Path:
    """A prepared data dir written with the real shard writer: block i of shard s starts with token 1000·s + i, so a
    block names itself — or, `trainable`, holds ids below `vocab` in a pattern a model can learn. `sources` names the
    source of each shard (consecutive shards per source; default: one source)."""
    sources = sources or ["corpus"] * len(shard_sizes)
    splits = {}
    for split in ("train", "val"):
        (tmp_path / split).mkdir(parents=True)
        shards = []
        for s, n in enumerate(shard_sizes):
            blocks = np.zeros((n, 5), dtype=np.uint16)
            blocks[:, 0] = 1000 * s + np.arange(n)
            blocks[:, 1:] = np.arange(4) + s
            if trainable:
                blocks = ((np.arange(5) * (s + 2) + np.arange(n)[:, None]) % vocab).astype(np.uint16)
            name = f"{split}/shard-{s:06d}.tar"
            written = write_shard(tmp_path / name, blocks, f"{split}-{s:06d}")
            shards.append({"file": name, "sequences": n, "tokens": n * 5, "bytes": written.bytes,
                           "sha256": written.sha256, "index_sha256": written.index_sha256, "source": sources[s]})
        splits[split] = {"shards": shards, "sequences": sum(shard_sizes), "doc_tokens": 10, "documents": 2,
                         "text_bytes": 40}
    names = list(dict.fromkeys(sources))
    per_source = [{"name": name, "splits": {split: {
        "blocks": sum(n for n, s in zip(shard_sizes, sources) if s == name),
        "tokens": 5 * sum(n for n, s in zip(shard_sizes, sources) if s == name),
        "documents": 1, "doc_tokens": 5, "text_bytes": 20} for split in ("train", "val")}} for name in names]
    manifest = {"format_version": 4, "fingerprint": "f" * 16, "vocab_size": vocab, "seq_len": 4, "dtype": "uint16",
                "eot_id": 0, "eot_token": "<|endoftext|>", "splits": splits, "sources": per_source}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def _names(sizes: list[int]) -> list[int]:
    """Every block's first token in sample-id order (manifest order)."""
    return [1000 * s + i for s, n in enumerate(sizes) for i in range(n)]


def _consumed(data: Path, world: int, first: int, steps: int, batch: int, micro: int, seed: int) -> list[list[int]]:
    """Per global step, the blocks (their first tokens) the ranks of a `world`-sized group train on, in rank order."""
    reader = SampleReader(data, "train")
    order = SampleOrder(reader.num_samples, seed)
    ranks = [rank_steps(reader, order, first, batch, micro, r, world) for r in range(world)]
    out = []
    for step in range(first, first + steps):
        parts = [next(it) for it in ranks]
        assert all(p.step == step for p in parts)
        accum = grad_accum(batch, micro, world)
        assert all(len(p.micro_batches) == len(p.weights) == accum for p in parts)
        # DeepSpeed averages over world × accum micro-batch losses: the weights make that the global batch's mean
        assert sum(w for p in parts for w in p.weights) == pytest.approx(world * accum)
        assert all(w == 1.0 for p in parts for w in p.weights) == (world in even_world_sizes(batch, micro, world))
        out.append([int(b[0]) for p in parts for mb in p.micro_batches for b in mb])
    reader.close()
    return out


def test_the_global_batches_do_not_depend_on_the_world_size_or_the_resume(tmp_path: Path) -> None:
    data = hand_made_data(tmp_path, SIZES)
    batch, micro, seed, steps = 12, 2, 5, 200
    assert even_world_sizes(batch, micro, 5) == [1, 2, 3]  # 4 and 5 pad: 4 ranks × 2 micro-batches of ≤ 2 hold 16
    reference = _consumed(data, 1, 0, steps, batch, micro, seed)
    for world in (2, 3, 4, 5):
        assert _consumed(data, world, 0, steps, batch, micro, seed) == reference, world
    for cut, world in [(1, 2), (7, 3), (20, 4), (37, 1), (150, 5), (199, 3)]:  # resumed at `cut` with another size
        assert _consumed(data, world, cut, steps - cut, batch, micro, seed) == reference[cut:], (cut, world)
    stream = [b for step in reference for b in step]  # 200 × 12 = 2400 positions, 88 epochs of 27 and a part
    n = sum(SIZES)
    for epoch in range(len(stream) // n):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == sorted(_names(SIZES)), epoch  # each sample once
    assert stream[:n] != stream[n : 2 * n]  # every epoch has its own permutation, across shards
    assert _consumed(data, 2, 0, 5, batch, micro, seed + 1) != reference[:5]  # another seed, another order


def test_micro_batches_and_world_sizes() -> None:
    order = SampleOrder(10, seed=0)
    assert grad_accum(16, 2, 4) == 2 and grad_accum(16, 4, 4) == 1 and grad_accum(16, 4, 3) == 2  # parts 5, 5, 6
    with pytest.raises(DataError, match="^world size 17 exceeds train.global_batch_size 16: a worker would have no sample"):
        grad_accum(16, 2, 17)
    assert order.global_batch(2, 4).tolist() == np.concatenate([order.epoch(0)[8:], order.epoch(1)[:2]]).tolist()
    assert [order.rank_slice(0, 4, r, 2).tolist() for r in range(2)] == [order.epoch(0)[:2].tolist(),
                                                                          order.epoch(0)[2:4].tolist()]
    assert val_ids(100, 5, 0, 2).tolist() == [0, 2, 4] and val_ids(100, 5, 1, 2).tolist() == [1, 3]
    assert val_ids(3, 5, 0, 1).tolist() == [0, 1, 2]


def test_the_reader_returns_what_prepare_wrote_from_disk_and_bucket(tmp_path: Path, s3_bucket: str) -> None:
    data = hand_made_data(tmp_path / "local", SIZES)
    uri = bucket_copy(data, f"{s3_bucket}/{tmp_path.name}")
    ids = np.random.default_rng(0).permutation(sum(SIZES))
    for where in (data, uri):
        reader = SampleReader(where, "train")
        blocks = reader.read_many(ids)
        assert [int(b[0]) for b in blocks] == [_names(SIZES)[i] for i in ids]
        assert blocks.dtype == np.uint16 and blocks.shape == (27, 5)
        reader.close()
    assert _consumed(uri, 2, 3, 10, 6, 1, 9) == _consumed(data, 3, 3, 10, 6, 2, 9)


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_block_whose_bytes_differ_is_refused(tmp_path: Path, s3_bucket: str, where: str) -> None:
    """One changed token in shard 2 (same size): reading that block stops with one line; the others still read.
    A changed block index is refused too."""
    data = hand_made_data(tmp_path / "local", SIZES)
    root = str(data) if where == "local" else bucket_copy(data, f"{s3_bucket}/{tmp_path.name}-{where}")
    shard = f"{root}/train/shard-000002.tar"
    raw = bytearray(files.read_bytes(shard))
    stride = SampleReader(root, "train").stride
    raw[stride + 512 + 128] ^= 1  # block 1's first token
    files.atomic_write(shard, bytes(raw))
    reader = SampleReader(root, "train")
    assert int(reader.read(3 + 4 + 0)[0]) == 2000  # block 0 of shard 2 is intact
    with pytest.raises(DataError, match=r"^corrupt shard .*shard-000002.tar block 1: its bytes differ from the shard's block index$"):
        reader.read(3 + 4 + 1)
    index = f"{root}/train/shard-000003.idx"
    files.atomic_write(index, files.read_bytes(index)[:-1] + b"\0")
    with pytest.raises(DataError, match=r"^missing or corrupt block index .*shard-000003.idx"):
        SampleReader(root, "train").read(3 + 4 + 5)


def test_read_ahead_is_bounded_and_passes_errors_on() -> None:
    produced: list[int] = []

    def items() -> Iterator[int]:
        for i in range(10):
            produced.append(i)
            yield i
        raise ValueError("reader failed")

    stream = read_ahead(items(), depth=2)
    for i in range(4):
        assert next(stream) == i
        assert len(produced) <= i + 1 + 2 + 1  # what was taken, the queue, the one waiting to be put
    with pytest.raises(ValueError, match="reader failed"):
        list(stream)
