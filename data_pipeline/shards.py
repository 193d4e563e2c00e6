"""Webdataset shard writing and the manifest: deterministic bytes, temp names renamed when complete.

Run inside Ray Data by `raygpt prepare CONFIG`. Each tar sample is one packed block stored as
`<key>.input_ids.npy`, which plain `webdataset` decodes back to a numpy array.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(path: Path, blocks: np.ndarray, key_prefix: str) -> str:
    """Write blocks (n, seq_len + 1) as one tar; fixed mtime/owner make the bytes reproducible. Returns its sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, wds.TarWriter(f, user="raygpt", group="raygpt", mtime=0) as sink:
        for i, block in enumerate(blocks):
            sink.write({"__key__": f"{key_prefix}-{i:07d}", "input_ids.npy": block})
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_manifest(data_dir: Path) -> dict[str, Any] | None:
    """The finished manifest of a data dir, or None when there is none (never prepared, or crashed before the end)."""
    path = data_dir / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())
