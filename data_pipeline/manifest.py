"""The manifest of prepared data (RUN_DIR/data/manifest.json), typed, with its one reader and the helpers every stage
that consumes shards needs: verified shard paths, every block of a split, tokens per byte.

    python -m data_pipeline.manifest runs/demo/data        # checks every shard (size, sha256) and prints a summary

Written last and atomically by `raygpt prepare` (data_pipeline/prepare.py): the data is complete exactly when the
manifest exists. Read by training, evaluation and quantization through `read_manifest` only. Shard paths are
relative to the data folder and must stay inside it. The data folder may be on object storage (`core.files`):
shards are then streamed, never downloaded whole.
"""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from webdataset.tariterators import group_by_keys, tar_file_expander

from core import files
from core.config import problem_line
from core.errors import RunFileError
from core.files import inside
from core.layout import SPLITS, DataLayout, Location, is_uri, join
from data_pipeline.config import DataError
from data_pipeline.shards import BLOCK_DIGEST, index_name

FORMAT_VERSION = 4
"""Version 4: every shard holds one source's blocks (`source`), and `sources` lists each one's name and blocks.
Version 3: each shard has a block index (`<shard>.idx`, its sha256 in `index_sha256`; `data_pipeline.shards`).
Version 2: `fingerprint` (config and source files) replaced version 1's `config_hash`."""


NonNegative = Annotated[int, Field(ge=0)]


class ShardEntry(BaseModel):
    """One tar of a split."""

    model_config = ConfigDict(extra="forbid")
    file: str
    sequences: NonNegative
    tokens: NonNegative
    bytes: NonNegative
    sha256: str
    index_sha256: str
    """sha256 of the block index beside the tar (`<shard>.idx`: an 8-byte digest per block)."""
    source: str
    """The source whose documents its blocks hold (a block never mixes sources)."""


class SourceSplit(BaseModel):
    """What one split kept of one source."""

    model_config = ConfigDict(extra="forbid")
    blocks: NonNegative
    """Blocks (samples) of seq_len + 1 tokens."""
    tokens: NonNegative
    """Tokens in those blocks."""
    documents: NonNegative
    doc_tokens: NonNegative
    text_bytes: NonNegative


class SourceEntry(BaseModel):
    """One source of the corpus: what was read and what each split kept of it (more fields may be present)."""

    model_config = ConfigDict(extra="allow")
    name: str
    splits: dict[str, SourceSplit]


class SplitEntry(BaseModel):
    """One split: its shards and totals (more totals may be present)."""

    model_config = ConfigDict(extra="allow")
    shards: list[ShardEntry]
    sequences: NonNegative
    documents: NonNegative
    doc_tokens: NonNegative
    text_bytes: NonNegative


class Manifest(BaseModel):
    """What a consumer of the shards relies on; the rest of the file (sources, drops, config) is carried along."""

    model_config = ConfigDict(extra="allow", frozen=True)
    format_version: int
    fingerprint: str
    vocab_size: Annotated[int, Field(ge=1, le=1 << 24)]
    seq_len: Annotated[int, Field(ge=1, le=1 << 24)]
    dtype: str
    eot_id: NonNegative
    eot_token: str
    splits: dict[str, SplitEntry]
    sources: list[SourceEntry]
    loss_mask: bool = False
    """Chat data (`data_pipeline.chat_data`): each block is (2, seq_len + 1), token ids over a loss mask (1 where the
    token is trained on); packed conversations end with end-of-text. Each split's `chat` totals count them."""
    sample_key: str = "input_ids.npy"
    """The tar member of each block."""

    @property
    def block_shape(self) -> tuple[int, ...]:
        """(seq_len + 1,), or (2, seq_len + 1) with a loss mask."""
        return (2, self.seq_len + 1) if self.loss_mask else (self.seq_len + 1,)

    def source_ranges(self, split: str) -> dict[str, tuple[int, int]]:
        """Source name → (its first sample id, its number of samples) in a split, in the order of `sources`: the
        shards hold the sources in that order, so each source's samples are one range (maybe empty)."""
        order = {s.name: i for i, s in enumerate(self.sources)}
        counts = [0] * len(self.sources)
        last = 0
        for shard in self.splits[split].shards:
            if shard.source not in order:
                raise RunFileError(f"manifest: shard {shard.file} names source {shard.source!r}, which is not listed")
            if order[shard.source] < last:
                raise RunFileError(f"manifest: the {split} shards of the sources are not in the order of `sources`")
            last = order[shard.source]
            counts[last] += shard.sequences
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
        return {s.name: (int(start), count) for s, start, count in zip(self.sources, starts, counts)}

    def index_path(self, data_dir: Location, shard: ShardEntry) -> Location:
        """The block index of a shard (beside it, inside the data folder)."""
        return _inside(data_dir, index_name(shard.file))

    def shard_paths(self, data_dir: Location, split: str) -> list[tuple[Location, ShardEntry]]:
        """(absolute path or URI, entry) of every shard of a split, each checked to lie inside the data folder."""
        return [(_inside(data_dir, s.file), s) for s in self.splits[split].shards]

    def tokens_per_byte(self, split: str = "val", source: str | None = None) -> float:
        """Tokens (documents' tokens plus one end-of-text each) per UTF-8 byte of document text, of a split or of one
        source's part of it: turns nats/token into bits per byte, the tokenizer-independent measure."""
        s = self.splits[split] if source is None else next(e for e in self.sources if e.name == source).splits[split]
        return (s.doc_tokens + s.documents) / max(s.text_bytes, 1)

    def blocks(self, data_dir: Location, split: str, source: str | None = None) -> Iterator[np.ndarray]:
        """Every block's token ids (seq_len + 1,) of a split (or of one source's part of it) once, in shard order
        (consecutive blocks of a shard are consecutive in its stream; chat blocks without their mask); each shard's
        sha256 is checked as it is read."""
        for path, shard in self.shard_paths(data_dir, split):
            if source is None or shard.source == source:
                for block in shard_blocks(path, shard.sha256, self.sample_key):
                    yield block[0] if self.loss_mask else block

    def verify(self, data_dir: Location, hashes: bool = True) -> None:
        """Every shard and block index exists with the listed size (and sha256); each split has at least one."""
        for split in SPLITS:
            if not self.splits[split].shards:
                raise DataError(f"{data_dir}: the {split} split has no shards")
            for path, shard in self.shard_paths(data_dir, split):
                found = files.size(path)
                if found is None:
                    raise DataError(f"missing shard {path}")
                if found != shard.bytes or (hashes and files.sha256(path) != shard.sha256):
                    raise DataError(f"corrupt shard {path} (size or sha256 differs from the manifest)")
                index = self.index_path(data_dir, shard)
                if files.size(index) != shard.sequences * BLOCK_DIGEST:
                    raise DataError(f"missing or corrupt block index {index}")


def _inside(data_dir: Location, relative: str) -> Location:
    if not is_uri(data_dir):
        return inside(data_dir, relative, "manifest shard path")
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts or "://" in relative:
        raise RunFileError(f"{data_dir}: manifest shard path {relative!r} leaves the data folder")
    return join(data_dir, *rel.parts)


class _Hashed:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.digest = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        chunk = self.raw.read(n)
        self.digest.update(chunk)
        return chunk


def shard_blocks(path: Location, sha256: str | None = None, key: str = "input_ids.npy") -> Iterator[np.ndarray]:
    """Blocks of one tar, in order, streamed (a local file or an object: never read whole) and decoded by
    webdataset's own tar iterator. With `sha256`, the bytes are hashed on the way and a shard that differs from the
    manifest fails with one line once it has been read."""
    with files.open_read(path) as raw:
        stream = _Hashed(raw)
        for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])):
            yield np.load(io.BytesIO(sample[key]), allow_pickle=False)
        while stream.read(1 << 20):  # the tar's end padding
            pass
    if sha256 is not None and stream.digest.hexdigest() != sha256:
        raise DataError(f"corrupt shard {path} (sha256 differs from the manifest)")


def parse(raw: Any, where: Location) -> Manifest:
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        version = raw.get("format_version") if isinstance(raw, dict) else None
        raise DataError(f"{where}: manifest format {version}, this raygpt reads {FORMAT_VERSION}; re-run raygpt prepare "
                        "with data.overwrite=true")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise DataError(f"{where}: bad manifest field {problem_line(e)}") from None


def _data(data_dir: Location) -> DataLayout:
    return DataLayout(data_dir if is_uri(data_dir) else Path(data_dir))


def read_manifest(data_dir: Location) -> Manifest:
    """The manifest of a data folder; missing, corrupt or of another version → one-line DataError."""
    where = _data(data_dir).manifest
    if not files.is_file(where):
        raise DataError(f"{data_dir}: no manifest.json (run `raygpt prepare` first)")
    try:
        return parse(files.read_json(where, "manifest"), where)
    except RunFileError as e:
        raise DataError(str(e)) from None


def finished(data_dir: Location) -> Manifest | None:
    """The manifest when the data folder holds finished data, else None (never prepared, or crashed before the end)."""
    return read_manifest(data_dir) if files.is_file(_data(data_dir).manifest) else None


if __name__ == "__main__":
    folder: Location = sys.argv[1] if len(sys.argv) > 1 else "runs/demo/data"
    manifest = read_manifest(folder)
    manifest.verify(folder)
    for name in SPLITS:
        split = manifest.splits[name]
        print(f"{name}: {len(split.shards)} shard(s), {split.sequences:,} blocks of {manifest.seq_len + 1} tokens: intact")
