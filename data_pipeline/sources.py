"""Corpus sources → one Ray Dataset of document rows (text, source, nbytes, drop, utf8_replaced).

Run by `raygpt prepare CONFIG`. Paths are expanded on the driver (globs, directories, URIs; Ray's readers reject
globs), checked, and handed to Ray Data's readers: `read_binary_files` for text, `read_json`, `read_parquet`,
`from_huggingface` (streamed) — the per-document work happens in Ray Data batches, never in a driver loop.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.data

from core.errors import one_line
from data_pipeline.clean import documents_batch, field_batch
from data_pipeline.config import CleanConfig, DataError, SourceConfig

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


def _check_field(kind: str, path: str, text_field: str) -> None:
    """Fail early, with the file named, when the text field is absent from the first record."""
    if _is_uri(path):
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
    if text_field not in names:
        raise DataError(f"{path}: no text field {text_field!r} (fields: {', '.join(names)}); set the source's text_field")


def _first_line(stream: Any, limit: int = 1 << 24) -> bytes:
    """The first line of a binary stream, read in chunks (at most `limit` bytes)."""
    line = b""
    while b"\n" not in line and len(line) < limit and (chunk := stream.read(65536)):
        line += chunk
    return line.split(b"\n", 1)[0]


def _read_json_lines(paths: list[str], blocks: int) -> ray.data.Dataset:
    """`ray.data.read_json(paths, lines=True)` — streamed, a compressed file decompressed on the way — except that a
    corrupt or truncated file is one line naming it. Ray's reader says only what pandas or the codec said ("Truncated
    compressed stream"), so its datasource is subclassed to add the file and how far it got."""
    from ray.data._internal.datasource.json_datasource import PandasJSONDatasource

    class NamedJSONLines(PandasJSONDatasource):
        def _read_stream(self, f: Any, path: str) -> Any:
            rows = 0
            try:
                for frame in super()._read_stream(f, path):
                    rows += len(frame)
                    yield frame
            except Exception as e:  # pandas' ValueError on bad JSON, pyarrow's OSError on a truncated stream
                raise DataError(f"{path}: corrupt or truncated JSONL in the records after its first {rows:,} "
                                f"({one_line(e)})") from None

    readable = _readable(paths)
    source = NamedJSONLines(readable.pop("paths"), ray.data.DataContext.get_current().target_max_block_size,
                            file_extensions=None, **readable)
    return ray.data.read_datasource(source, override_num_blocks=blocks)


def _read_hf(src: SourceConfig) -> ray.data.Dataset:
    import datasets

    saved = Path(src.path)
    if any((saved / marker).is_file() for marker in ("state.json", "dataset_dict.json")):  # Dataset.save_to_disk
        loaded = datasets.load_from_disk(src.path)
        if isinstance(loaded, datasets.DatasetDict):
            if src.hf_split not in loaded:
                raise DataError(f"{src.path}: no split {src.hf_split!r} (splits: {', '.join(loaded)})")
            loaded = loaded[src.hf_split]
    else:
        try:
            loaded = datasets.load_dataset(src.path, src.hf_config, split=src.hf_split, streaming=True)
        except Exception as e:
            raise DataError(f"cannot load Hugging Face dataset {src.path!r}: {str(e).splitlines()[0]}") from None
    columns = loaded.column_names
    if columns is not None and src.text_field not in columns:
        raise DataError(f"{src.path}: no text field {src.text_field!r} (columns: {', '.join(columns)})")
    return ray.data.from_huggingface(loaded)


def _read_tasks(resolved: SourceFiles, num_cpus: int) -> int:
    """Read tasks (= blocks) of a file source: ~16 MB each, at least 8 per CPU so the cores share the tokenizing evenly
    (Ray's default of 200 tiny read tasks costs seconds of scheduling on a small machine)."""
    return max(1, min(len(resolved.files), max(8 * num_cpus, resolved.bytes // 16_000_000)))


def _interleaved(files: list[str]) -> list[str]:
    """Files in a fixed pseudo-random order: Ray cuts the list into read tasks by count, and sorted paths put similar
    files (a folder of large test fixtures) into the same task, which then runs alone at the end. The output does not
    depend on the order (placement is by content hash)."""
    return sorted(files, key=lambda f: hashlib.blake2b(f.encode(), digest_size=8).digest())


def read_source(resolved: SourceFiles, src: SourceConfig, clean: CleanConfig, num_cpus: int) -> ray.data.Dataset:
    """One resolved source → a Dataset of document rows."""
    if resolved.type == "hf":
        records = _read_hf(src)
    elif resolved.type in ("text", "python-stdlib"):
        split_by = "file" if resolved.type == "python-stdlib" else src.split_by
        blocks = _read_tasks(resolved, num_cpus)
        return ray.data.read_binary_files(**_readable(_interleaved(resolved.files)), override_num_blocks=blocks).map_batches(
            documents_batch,
            fn_kwargs={"source": resolved.index, "split_by": split_by, "invalid_utf8": clean.invalid_utf8},
            batch_size=32,
            batch_format="numpy",
        )
    else:
        _check_field(resolved.type, resolved.files[0], src.text_field)
        if resolved.type == "jsonl":
            records = _read_json_lines(resolved.files, _read_tasks(resolved, num_cpus))
        else:
            records = ray.data.read_parquet(**_readable(resolved.files), columns=[src.text_field], file_extensions=None)
    return records.map_batches(
        field_batch, fn_kwargs={"source": resolved.index, "field": src.text_field}, batch_format="numpy"
    )


def resolve_sources(sources: list[SourceConfig]) -> list[SourceFiles]:
    """Every source's files, listed and checked on the driver (no Ray)."""
    resolved = []
    for i, src in enumerate(sources):
        try:
            resolved.append(resolve(i, src))
        except DataError as e:
            raise DataError(f"data.sources[{i}]: {e}") from None
    return resolved


def read_sources(
    sources: list[SourceConfig], resolved: list[SourceFiles], clean: CleanConfig, num_cpus: int
) -> ray.data.Dataset:
    """Every resolved source → one Dataset of document rows."""
    readable = [(r, src) for r, src in zip(resolved, sources) if r.type == "hf" or r.files]
    if not readable:
        raise DataError("no readable input: every file of every source is unreadable")
    parts = [read_source(r, src, clean, num_cpus) for r, src in readable]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
