"""Units of work without Ray: JSONL byte ranges and Parquet row groups cover every record exactly once, in order,
whatever the unit size; corrupt records are named by file and byte or row group."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.clean import TEXT
from data_pipeline.config import DataError, SourceConfig
from data_pipeline.sources import resolve_sources
from data_pipeline.units import cut_units, read_unit


def _texts(sources: list[SourceConfig], unit_bytes: int, batch_bytes: int = 1000) -> tuple[int, list[str]]:
    units = cut_units(resolve_sources(sources), sources, unit_bytes)
    texts = [t for u in units for b in read_unit(u, sources[u.source], "replace", batch_bytes) for t in b[TEXT]]
    return len(units), texts


def test_jsonl_ranges_and_row_groups_cover_every_record_once(tmp_path: Path) -> None:
    records = [f"record {i} " + "x" * (i % 37) for i in range(500)]  # lines of uneven length
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": r}) + "\n" for r in records[:50]))
    pq.write_table(pa.table({"text": records, "meta": list(range(500))}), tmp_path / "t.parquet", row_group_size=64)
    for unit_bytes in (1024, 1500, 7777, 10**9):
        count, texts = _texts([SourceConfig(path=str(tmp_path / "r.jsonl"))], unit_bytes)
        assert texts == records and (count > 10) == (unit_bytes < 2000)  # a line cut by a range boundary: read once
        count, texts = _texts([SourceConfig(path=str(tmp_path / "t.parquet"))], unit_bytes)
        assert texts == records and (count > 1) == (unit_bytes < 10**9)
        count, texts = _texts([SourceConfig(path=str(tmp_path / "z.jsonl.gz"))], unit_bytes)
        assert texts == records[:50] and count == 1  # a compressed file is never cut


def test_a_corrupt_record_or_row_group_is_named(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text('{"text": "fine"}\n' * 100 + '{"text": "broken\n' + '{"text": "fine"}\n' * 10)
    with pytest.raises(DataError, match=r"r\.jsonl: byte 1,700: not a JSON object"):
        _texts([SourceConfig(path=str(tmp_path / "r.jsonl"))], 1024)  # in the second range: its byte only
    with pytest.raises(DataError, match=r"r\.jsonl: line 101 \(byte 1,700\): not a JSON object"):
        _texts([SourceConfig(path=str(tmp_path / "r.jsonl"))], 10**6)  # read from the start: its line too
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 20 for i in range(300)]}), path, row_group_size=100,
                   compression="none")
    meta = pq.ParquetFile(path).metadata.row_group(1).column(0)
    raw = bytearray(path.read_bytes())
    start = meta.data_page_offset
    raw[start + 40:start + 400] = b"\xff" * 360  # the second row group's data page
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"t\.parquet: row group 1: corrupt Parquet data"):
        _texts([SourceConfig(path=str(path))], 10**9)
