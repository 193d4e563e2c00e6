"""The training-side shard reader: each rank streams a disjoint part of the webdataset shards in a deterministic
global order, and can restart at exactly the next sample (used by `raygpt train` workers).

Order: every epoch the shard list is permuted with a generator seeded by (seed, epoch). With at least as many
shards as ranks, rank r reads shards r, r+W, r+2W, ... of that order; with fewer shards every rank reads all of them
and keeps samples i ≡ r (mod W). Each rank's stream runs on into the next epoch by itself, so every rank always has
data. The position (epoch, samples consumed this epoch) is saved in every checkpoint; resuming with the same number
of workers continues with exactly the next batch. With another number of workers the rank streams change: each rank
resumes at the same epoch, skipping the same count of its own new stream — no sample is lost from later epochs, but
within that epoch some samples may be seen twice or not at all.

Shards are streamed (a local file, or an object in s3:// / gs:// through `cluster.storage`), never downloaded whole:
a background thread reads ahead at most `read_ahead` blocks, so memory is bounded and reading overlaps the step.
Each shard's sha256 is checked as it is read; a shard that differs from the manifest stops training with one line.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from cluster.layout import Location
from data_pipeline.manifest import ShardEntry, read_manifest, shard_blocks

READ_AHEAD = 256
"""Blocks each rank's reader thread may hold before the step takes them."""


@dataclass
class Position:
    """Where a rank's stream stands: the epoch, and how many of its samples of that epoch it has consumed."""

    epoch: int = 0
    consumed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Position:
        return cls(**json.loads(text))


def read_ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """`items`, produced by a background thread at most `depth` ahead of the consumer (an error is re-raised here)."""
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(("item", item), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(("end", None))
        except BaseException as e:  # noqa: BLE001 — handed to the consumer, which raises it
            buffer.put(("error", e))

    thread = threading.Thread(target=produce, name="shard-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = buffer.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


class ShardStream:
    """Infinite stream of one rank's blocks (seq_len + 1,), resumable at a Position."""

    def __init__(self, data_dir: Location, split: str, rank: int, world: int, seed: int, start: Position | None = None,
                 depth: int = READ_AHEAD):
        manifest = read_manifest(data_dir)
        self.shards: list[tuple[Location, ShardEntry]] = manifest.shard_paths(data_dir, split)
        if not self.shards:
            raise ValueError(f"{data_dir}: the {split} split has no shards")
        self.rank, self.world, self.seed, self.depth = rank, world, seed, depth
        self.position = start or Position()

    def _epoch(self, epoch: int) -> list[tuple[Location, ShardEntry, int, int]]:
        """(shard, entry, first sample, step) pieces of this rank in this epoch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        shards = [self.shards[i] for i in order]
        if len(shards) >= self.world:
            return [(path, entry, 0, 1) for path, entry in shards[self.rank :: self.world]]
        return [(path, entry, self.rank, self.world) for path, entry in shards]  # too few shards: split the samples

    def _blocks(self, start: Position) -> Iterator[tuple[int, np.ndarray]]:
        """(epoch, block) of this rank from `start` on (the reader thread's side)."""
        epoch, skip = start.epoch, start.consumed
        while True:
            for path, entry, first, step in self._epoch(epoch):
                mine = len(range(first, entry.sequences, step))
                if skip >= mine:  # the whole piece was consumed before the resume: skip it unread
                    skip -= mine
                    continue
                for i, block in enumerate(shard_blocks(path, entry.sha256)):
                    if i < first or (i - first) % step:
                        continue
                    if skip:
                        skip -= 1
                        continue
                    yield epoch, block
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for epoch, block in read_ahead(self._blocks(Position(**asdict(self.position))), self.depth):
            if epoch != self.position.epoch:
                self.position = Position(epoch, 0)
            self.position.consumed += 1
            yield block

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """(batch_size, seq_len + 1) int64 tensors; the position counts exactly the samples handed out."""
        stream = iter(self)
        while True:
            yield torch.from_numpy(np.stack([next(stream) for _ in range(batch_size)]).astype(np.int64))


def val_blocks(data_dir: Location, rank: int, world: int, count: int) -> Iterator[np.ndarray]:
    """The first `count` val blocks of this rank (the same ones at every validation)."""
    stream = iter(ShardStream(data_dir, "val", rank, world, seed=0, depth=max(1, min(count, READ_AHEAD))))
    for _ in range(count):
        yield next(stream)
