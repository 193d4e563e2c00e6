"""The training-side data order and reader: the sequence of global batches is a pure function of (seed, step), the
same at every world size and after any resume; each rank reads only its slice of each global batch, sample by sample.

Used by `raygpt train` workers (trainer/loop.py); `python -m trainer.data RUN_DIR/data 3 8` prints the sample ids of
global batches 0..2 of size 8 (seed 1337) — what any run with that seed and global batch trains on.

Order (`SampleOrder`): the train split's blocks are numbered 0..N-1 in manifest order. Epoch e is the permutation
`default_rng([seed, e]).permutation(N)`; the epochs are concatenated into one endless stream, and global step s (from
0) trains on stream positions [s·B, (s+1)·B). A global batch may straddle two epochs; every sample of an epoch is used
exactly once. Rank r of W takes the slice [⌊r·B/W⌋, ⌊(r+1)·B/W⌋) of each global batch (`train.global_batch_size` B)
as A = ⌈⌈B/W⌉/m⌉ micro-batches of at most m (`train.micro_batch_size`), each weighted so that the gradient is the mean
over the B samples at any W (`StepData`); when m·W divides B every micro-batch is full and every weight is 1. The only
data position a checkpoint needs is the step.

Reading (`SampleReader`): every block in a shard takes the same number of tar bytes (a 512-byte header, then the .npy
padded to 512), so block i of a shard starts at byte i·S and is read directly — a `pread` locally, a ranged GET on
object storage (`core.files.open_random`), a few in parallel. Every block read is checked against the shard's
block index (`<shard>.idx`, an 8-byte blake2b digest per block, itself checked against the manifest's sha256 when
first read; `data_pipeline.shards`): a block whose bytes differ from what prepare wrote stops training with one line,
on local disk and on object storage alike, without reading whole shards.
"""

from __future__ import annotations

import hashlib
import io
import queue
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from core import files
from core.layout import Location
from data_pipeline.config import DataError
from data_pipeline.manifest import Manifest, read_manifest
from data_pipeline.pack import tar_bytes_per_block
from data_pipeline.shards import BLOCK_DIGEST, block_digest

READ_AHEAD = 4
"""Steps each rank's reader thread prepares before the training step takes them."""
READERS = 8
"""Blocks read in parallel (ranged reads: on object storage each one is a round trip)."""


def read_ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """`items`, produced by a background thread at most `depth` ahead of the consumer (an error is re-raised here)."""
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, item: Any) -> bool:
        """Hand one entry over, waiting for room; False once the consumer has gone."""
        while not stop.is_set():
            try:
                buffer.put((kind, item), timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as e:  # noqa: BLE001 — handed to the consumer, which raises it
            put("error", e)

    thread = threading.Thread(target=produce, name="sample-read-ahead", daemon=True)
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


def even_world_sizes(global_batch: int, micro_batch: int, up_to: int) -> list[int]:
    """World sizes ≤ up_to at which the global batch fills every micro-batch (no padded slots)."""
    return [w for w in range(1, up_to + 1) if global_batch % (w * micro_batch) == 0]


def rank_bounds(global_batch: int, world: int) -> np.ndarray:
    """Where each rank's contiguous part of a global batch starts (and the last one ends): sizes differ by at most one."""
    return np.array([r * global_batch // world for r in range(world + 1)])


def grad_accum(global_batch: int, micro_batch: int, world: int) -> int:
    """Micro-batches every rank runs per optimizer step: enough for the largest rank part. A world larger than the
    global batch (a rank with no sample at all) is one line."""
    if world > global_batch:
        raise DataError(f"world size {world} exceeds train.global_batch_size {global_batch}: a worker would have no "
                        "sample; use fewer workers or a larger global batch")
    largest_part = -(-global_batch // world)  # ⌈B/W⌉
    return -(-largest_part // micro_batch)


class SampleOrder:
    """The endless, world-size-independent sequence of sample ids of one split (see the module docstring)."""

    def __init__(self, num_samples: int, seed: int, stream: tuple[int, ...] = ()):
        """`stream` tells apart the orders of one seed (a mixture's sources: epoch e is keyed [seed, *stream, e])."""
        if num_samples < 1:
            raise DataError("the train split has no samples")
        self.n, self.seed, self.key = num_samples, seed, [seed, *stream]
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch(self, e: int) -> np.ndarray:
        """The permutation of epoch e (the last one is kept: consecutive batches mostly share an epoch). Safe from
        two threads (the reader's and the metrics'): each returns the permutation it checked."""
        cached = self._cached
        if cached is None or cached[0] != e:
            cached = self._cached = (e, np.random.default_rng([*self.key, e]).permutation(self.n))
        return cached[1]

    def span(self, start: int, stop: int) -> np.ndarray:
        """Sample ids at stream positions [start, stop)."""
        parts = []
        while start < stop:
            e, offset = divmod(start, self.n)
            take = min(stop - start, self.n - offset)
            parts.append(self.epoch(e)[offset : offset + take])
            start += take
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def global_batch(self, step: int, batch: int) -> np.ndarray:
        """The B sample ids of global step `step` (from 0)."""
        return self.span(step * batch, (step + 1) * batch)

    def rank_slice(self, step: int, batch: int, rank: int, world: int) -> np.ndarray:
        """Rank r's contiguous part of that global batch."""
        bounds = rank_bounds(batch, world)
        return self.global_batch(step, batch)[bounds[rank] : bounds[rank + 1]]


@dataclass(frozen=True)
class _Shard:
    location: Location
    index: Location  # its block index
    index_sha256: str
    first: int  # sample id of its block 0
    count: int


class SampleReader:
    """Blocks of one split by sample id, read directly at their byte offset (local file or object)."""

    def __init__(self, data_dir: Location, split: str, manifest: Manifest | None = None):
        manifest = manifest or read_manifest(data_dir)
        self.dtype = np.dtype(manifest.dtype)
        self.shape = manifest.block_shape  # (seq_len + 1,), or (2, seq_len + 1): ids over the loss mask
        self.block_len = int(np.prod(self.shape))  # values per block
        self.stride = tar_bytes_per_block(self.block_len, self.dtype)
        self.shards: list[_Shard] = []
        first = 0
        for location, entry in manifest.shard_paths(data_dir, split):
            self.shards.append(_Shard(location, manifest.index_path(data_dir, entry), entry.index_sha256, first,
                                      entry.sequences))
            first += entry.sequences
        self.num_samples = first
        self._starts = np.array([s.first for s in self.shards])
        # the exact .npy header the shard writer puts before every block's tokens (same dtype and shape every time)
        npy = io.BytesIO()
        np.save(npy, np.zeros(self.shape, self.dtype), allow_pickle=False)
        self._npy_header = npy.getvalue()[: npy.tell() - self.block_len * self.dtype.itemsize]
        self._files: dict[int, Any] = {}
        self._digests: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="sample-reader")

    def _file(self, shard: int) -> Any:
        with self._lock:
            if shard not in self._files:
                self._files[shard] = files.open_random(self.shards[shard].location)
            return self._files[shard]

    def _index(self, shard: int) -> bytes:
        """The shard's block digests, read once and checked against the manifest."""
        with self._lock:
            if shard not in self._digests:
                info = self.shards[shard]
                raw = files.read_bytes(info.index) if files.is_file(info.index) else None
                if raw is None or hashlib.sha256(raw).hexdigest() != info.index_sha256:
                    raise DataError(f"missing or corrupt block index {info.index} (re-run raygpt prepare)")
                self._digests[shard] = raw
            return self._digests[shard]

    def read(self, sample: int) -> np.ndarray:
        """One block (seq_len + 1,) — chat data (2, seq_len + 1) — checked against the shard's block index."""
        if not 0 <= sample < self.num_samples:
            raise IndexError(f"sample {sample} outside 0..{self.num_samples - 1}")
        shard = int(np.searchsorted(self._starts, sample, side="right")) - 1
        index = sample - self.shards[shard].first
        raw = self._file(shard).read_at(self.stride, index * self.stride)
        return self._decode(raw, shard, index)

    def read_many(self, samples: np.ndarray) -> np.ndarray:
        """(len(samples), *block shape) blocks in the given order, read in parallel."""
        return np.stack(list(self._pool.map(self.read, (int(s) for s in samples))))

    def _decode(self, raw: bytes, shard: int, index: int) -> np.ndarray:
        where = f"{self.shards[shard].location} block {index}"
        want = self._index(shard)[index * BLOCK_DIGEST : (index + 1) * BLOCK_DIGEST]
        if len(raw) != self.stride or block_digest(raw) != want:
            raise DataError(f"corrupt shard {where}: its bytes differ from the shard's block index")
        if raw[512 : 512 + len(self._npy_header)] != self._npy_header:
            raise DataError(f"corrupt shard {where}: not a .npy of {self.shape} {self.dtype} tokens")
        block = np.frombuffer(raw, self.dtype, count=self.block_len, offset=512 + len(self._npy_header))
        return block.reshape(self.shape)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


@dataclass(frozen=True)
class StepData:
    """What one rank trains on at one step: its sample ids and micro-batches, and the weight of each micro-batch's
    mean loss. DeepSpeed averages gradients over W ranks × A accumulated micro-batches; a micro-batch of n samples
    weighted n·W·A/B makes that average the mean over the B samples of the global batch however they are split — 1
    for every micro-batch when the split is even, less for a short one, 0 for an empty slot (a padding step)."""

    step: int
    ids: np.ndarray  # (samples of this rank,)
    micro_batches: list[np.ndarray]  # accum × (≤ m, seq_len + 1), chat (≤ m, 2, seq_len + 1); empty ones are padding
    weights: list[float]  # accum


def rank_steps(reader: SampleReader, order: SampleOrder, first_step: int, batch: int, micro: int, rank: int,
               world: int) -> Iterator[StepData]:
    """This rank's data for steps first_step, first_step + 1, ... (0-based global steps), read ahead on a thread."""

    accum = grad_accum(batch, micro, world)

    def produce() -> Iterator[StepData]:
        step = first_step
        while True:
            ids = order.rank_slice(step, batch, rank, world)
            blocks = reader.read_many(ids)
            parts = [blocks[i * micro : (i + 1) * micro] for i in range(accum)]
            yield StepData(step, ids, parts, [len(p) * world * accum / batch for p in parts])
            step += 1

    return read_ahead(produce(), READ_AHEAD)


def val_ids(num_samples: int, count: int, rank: int, world: int) -> np.ndarray:
    """The fixed validation set — the first `count` val blocks, the same at every world size — and rank r's share."""
    return np.arange(min(count, num_samples))[rank::world]


if __name__ == "__main__":
    folder, steps, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ids = SampleOrder(SampleReader(folder, "train").num_samples, seed=int(sys.argv[4]) if len(sys.argv) > 4 else 1337)
    for s in range(steps):
        print(f"step {s + 1}: {ids.global_batch(s, size).tolist()}")
