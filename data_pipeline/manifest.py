"""The manifest of prepared data (RUN_DIR/data/manifest.json), typed, with its one reader and the helpers every stage
that consumes shards needs: verified shard paths, every block of a split, tokens per byte.

    python -m data_pipeline.manifest runs/demo/data        # checks every shard (size, sha256) and prints a summary

Written last and atomically by `raygpt prepare` (data_pipeline/prepare.py): the data is complete exactly when the
manifest exists. Read by training, evaluation and quantization through `read_manifest` only. Shard paths are
relative to the data folder and must stay inside it.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.files import RunFileError, inside, read_json, sha256_file
from cluster.layout import SPLITS, DataLayout
from data_pipeline.config import DataError

FORMAT_VERSION = 2
"""Version 2: `fingerprint` (config and source files) replaced version 1's `config_hash`."""


class ShardEntry(BaseModel):
    """One tar of a split."""

    model_config = ConfigDict(extra="forbid")
    file: str
    sequences: int
    tokens: int
    bytes: int
    sha256: str


class SplitEntry(BaseModel):
    """One split: its shards and totals (more totals may be present)."""

    model_config = ConfigDict(extra="allow")
    shards: list[ShardEntry]
    sequences: int
    documents: int
    doc_tokens: int
    text_bytes: int


class Manifest(BaseModel):
    """What a consumer of the shards relies on; the rest of the file (sources, drops, config) is carried along."""

    model_config = ConfigDict(extra="allow", frozen=True)
    format_version: int
    fingerprint: str
    vocab_size: int
    seq_len: int
    dtype: str
    eot_id: int
    eot_token: str
    splits: dict[str, SplitEntry]

    def shard_paths(self, data_dir: Path, split: str) -> list[tuple[Path, ShardEntry]]:
        """(absolute path, entry) of every shard of a split, each checked to lie inside the data folder."""
        return [(inside(data_dir, s.file, "manifest shard path"), s) for s in self.splits[split].shards]

    def tokens_per_byte(self, split: str = "val") -> float:
        """Tokens (documents' tokens plus one end-of-text each) per UTF-8 byte of document text: turns nats/token into
        bits per byte, the tokenizer-independent measure."""
        s = self.splits[split]
        return (s.doc_tokens + s.documents) / max(s.text_bytes, 1)

    def blocks(self, data_dir: Path, split: str) -> Iterator[np.ndarray]:
        """Every block of a split once, in shard order (consecutive blocks of a shard are consecutive in its stream)."""
        for path, _ in self.shard_paths(data_dir, split):
            yield from shard_blocks(path)

    def verify(self, data_dir: Path, hashes: bool = True) -> None:
        """Every shard exists with the listed size (and sha256); each split has at least one."""
        for split in SPLITS:
            if not self.splits[split].shards:
                raise DataError(f"{data_dir}: the {split} split has no shards")
            for path, shard in self.shard_paths(data_dir, split):
                if not path.is_file():
                    raise DataError(f"missing shard {path}")
                if path.stat().st_size != shard.bytes or (hashes and sha256_file(path) != shard.sha256):
                    raise DataError(f"corrupt shard {path} (size or sha256 differs from the manifest)")


def shard_blocks(path: Path) -> Iterator[np.ndarray]:
    """Blocks of one tar, in order, read by plain webdataset (`nodesplitter=None`: any rank split is the caller's)."""
    dataset = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for sample in dataset:
        yield np.load(io.BytesIO(sample["input_ids.npy"]), allow_pickle=False)


def parse(raw: Any, where: Path) -> Manifest:
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        version = raw.get("format_version") if isinstance(raw, dict) else None
        raise DataError(f"{where}: manifest format {version}, this raygpt reads {FORMAT_VERSION}; re-run raygpt prepare "
                        "with data.overwrite=true")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise DataError(f"{where}: bad manifest field {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def read_manifest(data_dir: str | Path) -> Manifest:
    """The manifest of a data folder; missing, corrupt or of another version → one-line DataError."""
    where = DataLayout(Path(data_dir)).manifest
    if not where.is_file():
        raise DataError(f"{data_dir}: no manifest.json (run `raygpt prepare` first)")
    try:
        return parse(read_json(where, "manifest"), where)
    except RunFileError as e:
        raise DataError(str(e)) from None


def finished(data_dir: str | Path) -> Manifest | None:
    """The manifest when the data folder holds finished data, else None (never prepared, or crashed before the end)."""
    return read_manifest(data_dir) if DataLayout(Path(data_dir)).manifest.is_file() else None


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/data")
    manifest = read_manifest(folder)
    manifest.verify(folder)
    for name in SPLITS:
        split = manifest.splits[name]
        print(f"{name}: {len(split.shards)} shard(s), {split.sequences:,} blocks of {manifest.seq_len + 1} tokens: intact")
