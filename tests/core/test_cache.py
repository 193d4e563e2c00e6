"""core/cache.py: the local checkpoint cache keeps within RAYGPT_CACHE_GB, deleting the least recently used copies
first and never the one in use; a bad setting is one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core import cache
from core.errors import UserError


def _copy(root: Path, name: str, size: int, used_at: float) -> Path:
    folder = root / "checkpoints" / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    os.utime(folder, (used_at, used_at))
    return folder


def test_least_recently_used_copies_go_first_and_the_one_in_use_stays(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYGPT_CACHE", str(tmp_path))
    monkeypatch.setenv("RAYGPT_CACHE_GB", str(2500 / 1e9))  # 2,500 bytes
    old, middle, new = (_copy(tmp_path, n, 1000, t) for n, t in (("old", 100.0), ("middle", 200.0), ("new", 300.0)))
    (tmp_path / "checkpoints" / ".partial.tmp").mkdir()  # a copy being written: not the cache's to judge
    cache.used(old)  # read again just now: the most recent
    assert cache.prune(keep=new) == [middle]  # 3,000 bytes > 2,500: the least recently used goes
    assert old.is_dir() and new.is_dir() and (tmp_path / "checkpoints" / ".partial.tmp").is_dir()
    assert cache.prune(keep=new, limit=0) == [old]  # a limit of 0 keeps only the copy in use
    assert new.is_dir()
    monkeypatch.setenv("RAYGPT_CACHE_GB", "lots")
    with pytest.raises(UserError, match=r"^RAYGPT_CACHE_GB='lots' is not a number of gigabytes$"):
        cache.limit_bytes()
