"""Streaming safetensors for training checkpoints: write a file tensor by tensor into any output (a local temp file or
an upload), hashing the bytes as they go, and read back byte ranges of single tensors by ranged reads.

Used by `trainer.state` (`python -m trainer.state STEP_DIR/state` lists a checkpoint's files).

Why not `safetensors.torch.save_file` / `safe_open` here: `save_file` needs the whole file in memory or on local disk
before it can be hashed or uploaded, and `safe_open` maps a local file only. A resume must read just its own slice of
each tensor, from a local disk or an object store alike; the format is simple enough (an 8-byte length, a JSON header,
the raw little-endian bytes) that the files stay readable by `safetensors` itself (tested).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import pyarrow as pa
import torch

from core.errors import RunFileError

DTYPE = "F32"  # every tensor of a training state is fp32 (master weights and Adam's moments)
HEADER_LIMIT = 64 << 20  # a header longer than this is a corrupt file, not a large one


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in a file: its shape and absolute byte range."""

    shape: tuple[int, ...]
    begin: int
    end: int


FLUSH_BYTES = 64 << 20
"""A local file is flushed to disk every this many bytes and its pages dropped from the page cache: the cache never
holds a burst of a whole checkpoint, whose write-back (and the reclaim of the memory it fills) would stall every other
process of the machine at once (training, on a CPU machine)."""


class _Hashing:
    """Counts and hashes what passes through to `out`, flushing a local file to disk as it goes."""

    def __init__(self, out: IO[bytes]):
        self.out, self.digest, self.bytes, self.unflushed = out, hashlib.sha256(), 0, 0
        try:
            self.fd: int | None = out.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None

    def write(self, data: bytes | memoryview) -> None:
        for start in range(0, len(data), FLUSH_BYTES):
            chunk = data[start:start + FLUSH_BYTES]
            self.out.write(chunk)
            self.digest.update(chunk)
            self.bytes += len(chunk)
            self.unflushed += len(chunk)
            if self.fd is not None and self.unflushed >= FLUSH_BYTES:
                self.out.flush()
                os.fdatasync(self.fd)
                if hasattr(os, "posix_fadvise"):  # written and on disk: its pages need not crowd the page cache
                    os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
                self.unflushed = 0


def write(tensors: dict[str, torch.Tensor], out: IO[bytes], metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write `tensors` (fp32, on the CPU) as one safetensors file into `out`, one tensor at a time; returns its record
    {bytes, sha256}."""
    header: dict[str, Any] = {"__metadata__": metadata or {}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32:
            raise ValueError(f"{name}: {tensor.dtype}, a training state holds fp32 only")
        size = tensor.numel() * 4
        header[name] = {"dtype": DTYPE, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    sink = _Hashing(out)
    sink.write(struct.pack("<Q", len(raw)) + raw)
    for tensor in tensors.values():
        sink.write(memoryview(tensor.detach().contiguous().numpy().view(np.uint8).reshape(-1)))
    return {"bytes": sink.bytes, "sha256": sink.digest.hexdigest()}


def read_header(source: pa.NativeFile, where: str) -> tuple[dict[str, Entry], int]:
    """The tensors of a safetensors file opened for ranged reads, and the bytes the header took to read."""
    head = source.read_at(8, 0)
    (length,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
    if not 0 < length <= HEADER_LIMIT:
        raise RunFileError(f"{where}: not a safetensors file (header length {length})")
    try:
        header = json.loads(source.read_at(length, 8))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunFileError(f"{where}: corrupt safetensors header") from None
    start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") != DTYPE:
            raise RunFileError(f"{where}: tensor {name!r} is not fp32")
        begin, end = info["data_offsets"]
        entries[name] = Entry(tuple(info["shape"]), start + begin, start + end)
    return entries, 8 + length


def parse(data: bytes | memoryview, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file read whole into memory (1-D fp32 read-only views of `data`, no copy)."""
    source = pa.BufferReader(data)
    entries, _ = read_header(source, where)
    buffer = np.frombuffer(data, dtype=np.uint8)
    with warnings.catch_warnings():  # read-only views: the caller copies them into the optimizer's own buffers
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(buffer[e.begin:e.end].view(np.float32)) for name, e in entries.items()}


def read_range(source: pa.NativeFile, entry: Entry, start: int, numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of a flattened fp32 tensor, by one ranged read."""
    raw = source.read_at(numel * 4, entry.begin + start * 4)
    return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())
