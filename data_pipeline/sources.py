"""Corpus sources → the files of each, listed and checked on the driver (globs, directories, URIs).

Run by `raygpt prepare CONFIG` before anything is written; `data_pipeline.units` cuts the files into units of work
and reads them in Ray tasks.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from data_pipeline.chat_data import chat_columns
from data_pipeline.config import DataError, SourceConfig

TEXT_EXTENSIONS = {".txt", ".md", ".rst", ".py", ".text", ".markdown", ".c", ".h", ".js", ".ts", ".java", ".rs", ".go"}
JSONL_EXTENSIONS = {".jsonl", ".json", ".ndjson"}
PARQUET_EXTENSIONS = {".parquet"}
COMPRESSED_EXTENSIONS = (".gz", ".zst", ".zstd", ".bz2")
"""JSONL files compressed whole: Ray Data's JSON reader decompresses them as a stream (pyarrow's codec from the
extension), so no file is decompressed to disk or into memory whole."""
_GLOB_CHARS = set("*?[")


@dataclass
class SourceFiles:
    """A source resolved on the driver: its type, the files to read and what was found unreadable."""

    index: int
    type: str
    label: str
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    unreadable: list[str] = field(default_factory=list)
    stamps: list[tuple[str, int, int]] = field(default_factory=list)
    """(path, size, mtime_ns) of every local file: a changed corpus changes the prepared data's fingerprint."""


def stdlib_files() -> list[str]:
    """This interpreter's standard-library .py files (site-packages excluded), sorted: the offline demo corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        str(p) for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts
    )


def _is_uri(path: str) -> bool:
    return "://" in path


def _list_uri(uri: str) -> list[tuple[str, int, int]]:
    """(URI, size, mtime_ns) of an object, or of every object under a prefix (through `core.files`)."""
    import pyarrow.fs as pafs

    from core import files

    fs, root = files.filesystem(uri)
    scheme = uri.split("://", 1)[0]
    info = files.info(uri)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"no such file or directory: {uri}")
    entries = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted((f"{scheme}://{e.path}", e.size, e.mtime_ns or 0) for e in entries if e.type == pafs.FileType.File)


def _readable(paths: list[str]) -> dict:
    """Ray Data reader arguments for these files: object-storage URIs are read through `core.files`'s file
    system (the same endpoint, credentials and retries as the rest of the run)."""
    if not paths or not _is_uri(paths[0]):
        return {"paths": paths}
    from core import files

    return {"paths": [f.split("://", 1)[1] for f in paths], "filesystem": files.filesystem(paths[0])[0]}


def _list_local(path: str, extensions: set[str] | None, follow_symlinks: bool = False) -> list[str]:
    if any(c in path for c in _GLOB_CHARS):
        matches = sorted(os.path.abspath(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"glob matched no files: {path}")
        return matches
    p = Path(path)
    if p.is_file():
        return [str(p.resolve())]
    if p.is_dir():
        root = p.resolve()
        files = []
        seen: set[tuple[int, int]] = set()  # folders walked, by (device, inode): links that loop are walked once
        for folder, subfolders, names in os.walk(root, followlinks=follow_symlinks):
            here = os.stat(folder)
            if (here.st_dev, here.st_ino) in seen:
                subfolders.clear()
                continue
            seen.add((here.st_dev, here.st_ino))
            for name in names:
                f = Path(folder) / name
                if not f.is_file() or (extensions is not None and f.suffix not in extensions):
                    continue
                if not follow_symlinks and not f.resolve().is_relative_to(root):
                    continue  # a link out of the source folder: read only with follow_symlinks
                files.append(str(f.resolve() if follow_symlinks else f))
        if not files:
            raise DataError(f"directory holds no files of the source's extensions: {path}")
        return sorted(set(files))  # a file reached through two links is read once
    raise DataError(f"no such file or directory: {path}")


def _kind_of(path: str, extensions: list[str]) -> str | None:
    for compressed in COMPRESSED_EXTENSIONS:
        path = path.removesuffix(compressed)
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_EXTENSIONS:
        return "jsonl"
    if suffix in PARQUET_EXTENSIONS:
        return "parquet"
    if suffix in TEXT_EXTENSIONS or suffix in extensions:
        return "text"
    return None


def infer_type(src: SourceConfig) -> str:
    """The source type from the config, else from the extension of the path (or of the files of a directory)."""
    if src.type != "auto":
        return src.type
    if src.path == "python-stdlib":
        return "python-stdlib"
    if os.path.isdir(src.path):
        kinds = {k for f in _list_local(src.path, None, src.follow_symlinks) if (k := _kind_of(f, src.extensions))}
    else:
        kinds = {_kind_of(src.path, src.extensions)}
    if len(kinds) != 1 or None in kinds:
        raise DataError(
            f"cannot infer the type of source {src.path!r}; set its type (text, jsonl, parquet, hf, python-stdlib)"
        )
    return str(kinds.pop())


def resolve(index: int, src: SourceConfig) -> SourceFiles:
    """Expand one source's paths on the driver and check them."""
    kind = infer_type(src)
    resolved = SourceFiles(index=index, type=kind, label=src.path or kind)
    if kind == "hf":
        return resolved
    if kind == "python-stdlib":
        files = stdlib_files()
    elif _is_uri(src.path):
        for uri, size, mtime in _list_uri(src.path):  # a changed object (size, mtime) is a changed corpus
            resolved.files.append(uri)
            resolved.bytes += size
            resolved.stamps.append((uri, size, mtime))
        return resolved
    else:
        files = _list_local(src.path, set(src.extensions) if kind == "text" else None, src.follow_symlinks)
    for f in files:  # local files (URIs returned above)
        if not os.access(f, os.R_OK):
            resolved.unreadable.append(f)
        else:
            resolved.files.append(f)
            stat = os.stat(f)
            resolved.bytes += stat.st_size
            resolved.stamps.append((f, stat.st_size, stat.st_mtime_ns))
    return resolved


def check_field(kind: str, path: str, src: SourceConfig) -> None:
    """Fail early, with the file named, when the text field (a chat source: its conversation fields) is absent from
    the first record, or a chat source is not made of records."""
    if src.format == "chat" and kind not in ("jsonl", "parquet", "hf"):
        raise DataError(f"{path}: format chat reads JSONL, Parquet or Hugging Face records, not {kind} files")
    if _is_uri(path) or kind == "hf":
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    else:
        import pyarrow as pa

        try:  # decompressed on the way when the extension names a codec (.gz, .zst, .bz2)
            with pa.input_stream(path, compression="detect") as f:
                first = _first_line(f)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{path}: cannot read the first line ({str(e).splitlines()[0][:120]})") from None
        if not first.strip():
            return
        try:
            record = json.loads(first)
        except json.JSONDecodeError:
            raise DataError(f"{path}: the first line is not a JSON object (type jsonl expects one object per line)")
        names = list(record) if isinstance(record, dict) else []
    if src.format == "chat":
        try:
            chat_columns(src, names)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
    elif src.text_field not in names:
        raise DataError(f"{path}: no text field {src.text_field!r} (fields: {', '.join(names)}); set the source's "
                        "text_field")


def _first_line(stream: Any, limit: int = 1 << 24) -> bytes:
    """The first line of a binary stream, read in chunks (at most `limit` bytes)."""
    line = b""
    while b"\n" not in line and len(line) < limit and (chunk := stream.read(65536)):
        line += chunk
    return line.split(b"\n", 1)[0]


def resolve_sources(sources: list[SourceConfig]) -> list[SourceFiles]:
    """Every source's files, listed and checked on the driver (no Ray)."""
    resolved = []
    for i, src in enumerate(sources):
        try:
            resolved.append(resolve(i, src))
        except DataError as e:
            raise DataError(f"data.sources[{i}]: {e}") from None
    return resolved
