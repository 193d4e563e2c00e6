"""`core.files` as the one front door treats records as untrusted: size and depth bounds before anything is built,
and never writes through a planted symlink."""

from __future__ import annotations

from pathlib import Path

import pytest

from core import files
from core.errors import RunFileError, one_line, shown


def test_records_are_bounded_before_they_are_read(tmp_path: Path) -> None:
    big = tmp_path / "manifest.json"
    big.write_text('{"a": "' + "x" * 2000 + '"}')
    with pytest.raises(RunFileError, match=r"manifest of 2,009 bytes is over the 1,000 a record may have"):
        files.read_json(big, "manifest", limit=1000)
    deep = tmp_path / "commit.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RunFileError, match="corrupt commit record, nested too deeply"):
        files.read_json(deep, "commit record")


def test_logs_are_never_written_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "precious").write_text("mine")
    (tmp_path / "metrics.jsonl").symlink_to(tmp_path / "precious")
    with pytest.raises(RunFileError, match="metrics.jsonl: a symlink where raygpt writes its own file"):
        files.open_append(tmp_path / "metrics.jsonl")
    assert (tmp_path / "precious").read_text() == "mine"
    with files.open_append(tmp_path / "logs" / "console.log") as f:
        f.write("a line\n")
    assert (tmp_path / "logs" / "console.log").read_text() == "a line\n"


def test_echoed_values_are_cut() -> None:
    assert shown("short") == "'short'"
    assert shown("x" * 5_000_000) == "'" + "x" * 99 + "… (5,000,002 characters)"
    assert one_line(ValueError("first\nsecond")) == "first" and one_line(ValueError()) == "ValueError"
