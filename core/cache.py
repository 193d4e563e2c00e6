"""The bound on the local cache's downloaded checkpoints (`core.layout.cached_checkpoints()`): least recently used
copies are deleted once the cache holds more than RAYGPT_CACHE_GB (default 20) gigabytes, so that a long run that
evaluates or samples every checkpoint it publishes cannot fill the disk.

Called by `model.checkpoint.local_checkpoint` after each use; `python -m core.cache` lists the cache and prunes it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from core.errors import UserError
from core.files import remove
from core.layout import cached_checkpoints

DEFAULT_GB = 20.0


def limit_bytes() -> int:
    """RAYGPT_CACHE_GB (a number of gigabytes; 0 keeps only the copy in use) or the default."""
    raw = os.environ.get("RAYGPT_CACHE_GB", "")
    try:
        gb = float(raw) if raw else DEFAULT_GB
    except ValueError:
        raise UserError(f"RAYGPT_CACHE_GB={raw!r} is not a number of gigabytes") from None
    return int(max(gb, 0.0) * 1e9)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def used(folder: Path) -> None:
    """Mark a cached copy as just used (its folder's modification time is its last use)."""
    now = time.time()
    os.utime(folder, (now, now))


def prune(keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Delete the least recently used cached checkpoints until the rest fit in `limit` bytes (RAYGPT_CACHE_GB); never
    `keep` (the copy just used). Returns what was deleted. A copy another process deletes first is skipped."""
    root = cached_checkpoints()
    limit = limit_bytes() if limit is None else limit
    if not root.is_dir():
        return []
    entries = []
    for folder in root.iterdir():
        if folder.is_dir() and not folder.name.startswith("."):  # (atomic_folder's temp folders start with a dot)
            try:
                entries.append((folder.stat().st_mtime, _size(folder), folder))
            except FileNotFoundError:
                continue
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, folder in sorted(entries):
        if total <= limit:
            break
        if keep is not None and folder.resolve() == keep.resolve():
            continue
        remove(folder)
        total -= size
        removed.append(folder)
    return removed


if __name__ == "__main__":
    for path in prune(limit=int(float(sys.argv[1]) * 1e9) if len(sys.argv) > 1 else None):
        print(f"removed {path}")
    root = cached_checkpoints()
    left = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    print(f"{len(left)} cached checkpoint(s), {sum(_size(p) for p in left) / 1e9:.2f} GB in {root} "
          f"(limit {limit_bytes() / 1e9:g} GB, RAYGPT_CACHE_GB)")
