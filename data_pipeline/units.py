"""The corpus cut into units of work, and one unit read as a stream of document batches.

Run by `raygpt prepare CONFIG` (see `data_pipeline.prepare`). The driver cuts every source into units (`cut_units`):
  - text files (and the standard library): whole files, grouped in listing order up to about `unit_bytes`;
  - uncompressed JSONL: byte ranges of about `unit_bytes` (a line belongs to the range its first byte is in);
  - compressed JSONL: whole files (a compressed stream cannot be entered in the middle);
  - Parquet: runs of row groups; a saved Hugging Face dataset: row ranges; a hub dataset: its own shards.
A Ray task reads one unit with `read_unit`, a batch of about `batch_bytes` of documents at a time, so a task's memory
is bounded by the batch, not by the unit or the corpus. The cut depends only on the file listing and the config,
never on the number of nodes or CPUs: the units, and the shards written from them, are the same on any cluster.

Ray Data's readers are not used here: a unit must be re-read in exactly the same order by a later pass (the
duplicates are found before tokenizing, by position in the unit), resumed as a whole after a crash, and a corrupt
record must be named by its file and byte or row group — none of which Ray's read tasks expose.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from core import files
from core.chat import ChatError
from core.errors import one_line
from core.layout import is_uri
from data_pipeline.chat_data import chat_columns, chat_text
from data_pipeline.clean import NBYTES, documents_batch, field_batch
from data_pipeline.config import DataError, SourceConfig
from data_pipeline.sources import COMPRESSED_EXTENSIONS, SourceFiles

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Piece:
    """A part of one input: a whole file (`start=0, end=-1`), a byte range [start, end) of a JSONL file, row groups
    [start, end) of a Parquet file, rows [start, end) of a saved dataset, or shard `start` of `end` of a hub dataset."""

    path: str
    start: int = 0
    end: int = -1


@dataclass(frozen=True)
class Unit:
    """One unit of work: pieces of one source, read in order by one task."""

    id: int
    source: int
    kind: str
    bytes: int
    pieces: list[Piece] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(raw: dict[str, Any]) -> Unit:
        return Unit(**{**raw, "pieces": [Piece(**p) for p in raw["pieces"]]})


def auto_unit_bytes(total_bytes: int) -> int:
    """About 64 units per corpus, each 4-256 MB: enough units to keep every core busy on a small corpus, few enough
    (~4,000 per TB) that the per-unit files stay cheap to list and read on a large one."""
    return int(min(256e6, max(4e6, total_bytes / 64)))


def _compressed(path: str) -> bool:
    return path.endswith(COMPRESSED_EXTENSIONS)


def _row_groups(path: str) -> list[int]:
    """Uncompressed bytes of each row group of a Parquet file (read from its footer)."""
    import pyarrow.parquet as pq

    try:
        with files.open_random(path) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file ({one_line(e)})") from None
    return [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]


def _hf_pieces(src: SourceConfig, unit_bytes: int) -> list[tuple[Piece, int]]:
    """A saved dataset: row ranges of about unit_bytes; a hub dataset (streamed): one piece per shard of it."""
    loaded = _load_hf(src)
    import datasets

    if isinstance(loaded, datasets.Dataset):
        rows, size = len(loaded), loaded.data.nbytes
        step = max(1, math.ceil(rows * unit_bytes / max(size, 1)))
        return [(Piece(src.path, a, min(rows, a + step)), size * (min(rows, a + step) - a) // max(rows, 1))
                for a in range(0, rows, step)]
    n = loaded.num_shards  # a hub dataset's size, when its card gives one, weighs its shards (else ~1 GB each)
    split = (loaded.info.splits or {}).get(src.hf_split) if loaded.info else None
    size = (split.num_bytes if split and split.num_bytes else 0) or int(1e9) * n
    return [(Piece(src.path, i, n), size // n) for i in range(n)]


def cut_units(resolved: list[SourceFiles], sources: list[SourceConfig], unit_bytes: int | None) -> list[Unit]:
    """Every source's units, in source order (unit ids count across sources)."""
    total = sum(r.bytes for r in resolved)
    size = unit_bytes or auto_unit_bytes(total)
    units: list[Unit] = []

    def add(source: int, kind: str, pieces: list[tuple[Piece, int]]) -> None:
        group: list[Piece] = []
        nbytes = 0
        for piece, n in pieces:  # consecutive pieces grouped up to `size`
            if group and nbytes + n > size:
                units.append(Unit(len(units), source, kind, nbytes, group))
                group, nbytes = [], 0
            group.append(piece)
            nbytes += n
        if group:
            units.append(Unit(len(units), source, kind, nbytes, group))

    for r, src in zip(resolved, sources):
        if r.type == "hf":
            add(r.index, "hf", _hf_pieces(src, size))
            continue
        sizes = dict(zip((s[0] for s in r.stamps), (s[1] for s in r.stamps)))
        kind = "text" if r.type in ("text", "python-stdlib") else r.type
        pieces: list[tuple[Piece, int]] = []
        for path in r.files:
            n = sizes.get(path, 0)
            if kind == "jsonl" and not _compressed(path) and n > size:
                pieces += [(Piece(path, a, min(n, a + size)), min(n, a + size) - a) for a in range(0, n, size)]
            elif kind == "parquet":
                groups = _row_groups(path)
                run, run_bytes = 0, 0
                for g, g_bytes in enumerate(groups):
                    if g > run and run_bytes + g_bytes > size:
                        pieces.append((Piece(path, run, g), run_bytes))
                        run, run_bytes = g, 0
                    run_bytes += g_bytes
                pieces.append((Piece(path, run, len(groups)), run_bytes))
            else:
                pieces.append((Piece(path), n))
        add(r.index, kind, pieces)
    return units


# -- reading a unit (in a Ray task) -----------------------------------------------------------------------------------
def read_unit(unit: Unit, src: SourceConfig, invalid_utf8: str, batch_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    """The unit's document rows (text, source, nbytes, drop, utf8_replaced), not yet cleaned, in a fixed order, in
    batches of about `batch_bytes` of text (small files are gathered, a large file's documents cut)."""
    return rebatch(_pieces(unit, src, invalid_utf8, batch_bytes), batch_bytes)


def _pieces(unit: Unit, src: SourceConfig, invalid_utf8: str, batch_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    for piece in unit.pieces:
        if unit.kind == "text":
            split_by = "file" if src.type == "python-stdlib" or src.path == "python-stdlib" else src.split_by
            yield documents_batch({"bytes": [files.read_bytes(piece.path)]}, unit.source, split_by, invalid_utf8)
        elif unit.kind == "jsonl":
            where = piece.path + (f" (the lines from byte {piece.start:,})" if piece.start else "")
            yield from _record_batches(unit, _jsonl_records(piece), _text_of(src, where), batch_bytes)
        elif unit.kind == "parquet":
            yield from _parquet_batches(unit, piece, src, batch_bytes)
        else:
            where = f"{src.path} (part {piece.start} from {piece.end})"
            yield from _record_batches(unit, _hf_records(piece, src), _text_of(src, where), batch_bytes)


def _text_of(src: SourceConfig, where: str) -> Callable[[Any, int], Any]:
    """record, its number in the piece → the document: the text field's value, or for a chat source the rendered
    conversation (a bad one — unknown role, empty assistant turn — is one error naming the file and record)."""
    if src.format != "chat":
        return lambda record, n: record.get(src.text_field) if isinstance(record, dict) else None

    def rendered(record: Any, n: int) -> str:
        try:
            return chat_text(record, src)
        except ChatError as e:
            raise DataError(f"{where}: record {n + 1:,}: {e}") from None

    return rendered


def rebatch(batches: Iterator[dict[str, np.ndarray]], batch_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    """Row batches → batches of about batch_bytes (NBYTES summed): small ones joined, large ones cut by rows."""
    pending: list[dict[str, np.ndarray]] = []
    size = 0
    for rows in batches:
        n = len(rows[NBYTES])
        nbytes = int(rows[NBYTES].sum())
        if nbytes > batch_bytes and n > 1:
            for part in np.array_split(np.arange(n), min(n, math.ceil(nbytes / batch_bytes))):
                yield {k: v[part] for k, v in rows.items()}
            continue
        pending.append(rows)
        size += nbytes
        if size >= batch_bytes:
            yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            pending, size = [], 0
    if pending:
        yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}


def _record_batches(unit: Unit, records: Iterator[Any], text_of: Callable[[Any, int], Any], batch_bytes: int
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Records (dicts, or None for a line that is not an object) → field_batch rows, about batch_bytes at a time."""
    values: list[Any] = []
    size = 0
    for n, record in enumerate(records):
        value = text_of(record, n)
        values.append(value)
        size += len(value) if isinstance(value, str) else 0
        if size >= batch_bytes:
            yield field_batch({"text": values}, unit.source, "text")
            values, size = [], 0
    if values:
        yield field_batch({"text": values}, unit.source, "text")


def _lines(stream: Any, first: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of every line of a binary stream positioned at byte `first`."""
    rest, offset = b"", first
    while chunk := stream.read(_CHUNK):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield offset, line
            offset += len(line) + 1
    if rest:
        yield offset, rest


def _jsonl_records(piece: Piece) -> Iterator[dict[str, Any] | None]:
    """The records of a JSONL piece: a whole (maybe compressed) file, or the lines that start in [start, end). A line
    that is not JSON is one error naming the file and its byte offset."""
    import pyarrow as pa

    if _compressed(piece.path):
        if is_uri(piece.path):
            fs, path = files.filesystem(piece.path)
            opened = fs.open_input_stream(path, compression="detect")
        else:
            opened = pa.input_stream(piece.path, compression="detect")
        begin = 0
    else:
        opened = files.open_random(piece.path)
        begin = max(0, piece.start - 1)  # the byte before the range tells whether a line starts at `start`
        opened.seek(begin)
    end = piece.end if piece.end >= 0 else math.inf
    where, records = piece.start, 0  # the byte after the last good line; records read

    def at() -> str:  # the line number is known only when reading from the start of the file
        return f"line {records + 1:,} (byte {where:,})" if piece.start == 0 else f"byte {where:,}"

    try:
        with opened as stream:
            for offset, line in _lines(stream, begin):
                if offset < piece.start:
                    continue  # the tail of a line that started in the previous range (or its newline)
                if offset >= end:
                    return
                where = offset
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        raise DataError(f"{piece.path}: {at()}: not a JSON object ({one_line(e)})") from None
                    yield record if isinstance(record, dict) else None
                records += 1
                where = offset + len(line) + 1
    except (OSError, pa.ArrowInvalid) as e:  # a truncated or corrupt compressed stream
        raise DataError(f"{piece.path}: corrupt or truncated at {at()} of its text ({one_line(e)})") from None


def _parquet_batches(unit: Unit, piece: Piece, src: SourceConfig, batch_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    """Row groups [start, end) of a Parquet file, only the text column (a chat source: its conversation columns), a
    row group at a time (in batches)."""
    import pyarrow.parquet as pq

    text_field, text_of = src.text_field, _text_of(src, piece.path)
    with files.open_random(piece.path) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        if src.format == "chat":
            try:
                columns = chat_columns(src, names)
            except DataError as e:
                raise DataError(f"{piece.path}: {e}") from None
        elif text_field in names:
            columns = [text_field]
        else:
            raise DataError(f"{piece.path}: no text field {text_field!r} (fields: {', '.join(names)})")
        done = sum(parquet.metadata.row_group(g).num_rows for g in range(piece.start))  # record numbers in the file
        for g in range(piece.start, piece.end):
            meta = parquet.metadata.row_group(g)
            rows = max(1, int(meta.num_rows * batch_bytes / max(meta.total_byte_size, 1)))
            try:
                for batch in parquet.iter_batches(batch_size=rows, row_groups=[g], columns=columns):
                    values = ([text_of(record, done + n) for n, record in enumerate(batch.to_pylist())]
                              if src.format == "chat" else batch.column(0).to_pylist())  # text: one column, as is
                    done += len(values)
                    yield field_batch({"text": values}, unit.source, "text")
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"{piece.path}: row group {g}: corrupt Parquet data ({one_line(e)})") from None


def _load_hf(src: SourceConfig) -> Any:
    """A saved dataset (memory-mapped), or a hub dataset as a stream (never downloaded whole)."""
    import datasets
    from pathlib import Path

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
            raise DataError(f"cannot load Hugging Face dataset {src.path!r}: {one_line(e)}") from None
    columns = loaded.column_names
    if columns is not None and src.format == "chat":
        chat_columns(src, columns)
    elif columns is not None and src.text_field not in columns:
        raise DataError(f"{src.path}: no text field {src.text_field!r} (columns: {', '.join(columns)})")
    return loaded


def _hf_records(piece: Piece, src: SourceConfig) -> Iterator[dict[str, Any]]:
    import datasets

    loaded = _load_hf(src)
    if isinstance(loaded, datasets.Dataset):
        wanted = chat_columns(src, loaded.column_names) if src.format == "chat" else [src.text_field]
        column = loaded.select_columns(wanted).with_format("arrow")
        for a in range(piece.start, piece.end, 1024):
            yield from column[a:min(piece.end, a + 1024)].to_pylist()
    else:
        yield from loaded.shard(num_shards=piece.end, index=piece.start)
