"""The training-side shard reader: each rank streams a disjoint part of the webdataset shards in a deterministic
global order, and can restart at exactly the next sample (used by `raygpt train` workers).

Order: every epoch the shard list is permuted with a generator seeded by (seed, epoch). With at least as many
shards as ranks, rank r reads shards r, r+W, r+2W, ... of that order; with fewer shards every rank reads all of them
and keeps samples i ≡ r (mod W). Each rank's stream runs on into the next epoch by itself, so every rank always has
data. The position (epoch, samples consumed this epoch) is saved in every checkpoint; resuming with the same number
of workers continues with exactly the next batch. With another number of workers the rank streams change: each rank
resumes at the same epoch, skipping the same count of its own new stream — no sample is lost from later epochs, but
within that epoch some samples may be seen twice or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.manifest import read_manifest, shard_blocks


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


class ShardStream:
    """Infinite stream of one rank's blocks (seq_len + 1,), resumable at a Position."""

    def __init__(self, data_dir: Path, split: str, rank: int, world: int, seed: int, start: Position | None = None):
        manifest = read_manifest(data_dir)
        self.shards = [(path, shard.sequences) for path, shard in manifest.shard_paths(data_dir, split)]
        if not self.shards:
            raise ValueError(f"{data_dir}: the {split} split has no shards")
        self.rank, self.world, self.seed = rank, world, seed
        self.position = start or Position()

    def _epoch(self, epoch: int) -> list[tuple[Path, int, int]]:
        """(shard, first sample, step) pieces of this rank in this epoch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        shards = [self.shards[i] for i in order]
        if len(shards) >= self.world:
            return [(path, 0, 1) for path, _ in shards[self.rank :: self.world]]
        return [(path, self.rank, self.world) for path, _ in shards]  # too few shards: split the samples

    def __iter__(self) -> Iterator[np.ndarray]:
        counts = dict(self.shards)
        while True:
            skip = self.position.consumed
            for path, first, step in self._epoch(self.position.epoch):
                mine = len(range(first, counts[path], step))
                if skip >= mine:  # the whole piece was consumed before the resume: skip it unread
                    skip -= mine
                    continue
                for i, block in enumerate(shard_blocks(path)):
                    if i < first or (i - first) % step:
                        continue
                    if skip:
                        skip -= 1
                        continue
                    self.position.consumed += 1
                    yield block
            self.position = Position(self.position.epoch + 1, 0)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """(batch_size, seq_len + 1) int64 tensors; the position counts exactly the samples handed out."""
        stream = iter(self)
        while True:
            yield torch.from_numpy(np.stack([next(stream) for _ in range(batch_size)]).astype(np.int64))


def val_blocks(data_dir: Path, rank: int, world: int, count: int) -> Iterator[np.ndarray]:
    """The first `count` val blocks of this rank (the same ones at every validation)."""
    stream = iter(ShardStream(data_dir, "val", rank, world, seed=0))
    for _ in range(count):
        yield next(stream)
