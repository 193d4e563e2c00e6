"""How raygpt writes files: the one atomic write, the one atomic folder, the one pointer swap, the one JSON reader and
the one stage-completion marker. Every module that writes under a run directory (or any cache) goes through here.

    python -c "from cluster.files import write_json; write_json('/tmp/x.json', {'a': 1})"

An atomic write goes to a unique temp name in the destination's own folder (`.NAME.<random>.tmp`, so concurrent
writers never share one), is flushed and fsynced, renamed over the destination, and the folder is fsynced so the
rename survives a power cut. A reader therefore sees the old file or the new one, never half of one. Folders are
built under a unique temp name and renamed into place; a published "latest" is a symlink swapped with one rename.

A stage is complete when its record (written last, atomically) carries the fingerprint of what produced it:
`completed(path, fingerprint)` is the one test every stage uses to skip work that is already done.

This is the bottom layer of the project (standard library only): every package may import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from cluster.errors import UserError


class RunFileError(UserError, ValueError):
    """A file of the run that is missing, corrupt or in the way; the message is one line for the user."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"


@contextmanager
def atomic_stream(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file object whose contents replace `path` when the block exits normally (and never otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace `path` with `data` (str is written as UTF-8) atomically."""
    with atomic_stream(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON file, or a one-line RunFileError naming it when it is missing, unreadable or not valid JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFileError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunFileError(f"{path}: unreadable {what} ({type(e).__name__})") from None
    return parse_json(text, path, what)


def parse_json(text: str, where: str | Path, what: str) -> Any:
    """JSON text read from `where`, or a one-line RunFileError naming it (shared with `cluster.storage`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunFileError(f"{where}: corrupt {what}, not valid JSON ({e.msg} at line {e.lineno}); delete it to redo") from None


@contextmanager
def atomic_folder(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """A fresh temp folder beside `path`, renamed to `path` when the block exits normally. An existing `path` is an
    error unless `replace`; then it is renamed aside first and deleted only once the new folder is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists() or path.is_symlink():
            if not replace:
                raise RunFileError(f"{path} already exists")
            old = _temp_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        remove(old)


def point(link: str | Path, target: str | Path) -> Path:
    """Make `link` a symlink to `target` (relative when both share a folder tree), replacing any previous link in one
    rename: readers always see the old target or the new one."""
    link, target = Path(link), Path(target)
    if link.exists() and not link.is_symlink():
        raise RunFileError(f"{link} exists and is not a link raygpt made; move it away")
    tmp = _temp_name(link)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)
    return link


def remove(path: str | Path) -> None:
    """Delete a file, link or folder (missing is fine)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def move_aside(path: str | Path, label: str) -> Path:
    """Rename `path` to a new sibling `NAME.LABEL-N` (nothing is deleted); returns the new name."""
    path = Path(path)
    for n in range(1, 10_000):
        aside = path.with_name(f"{path.name}.{label}-{n}")
        if not aside.exists():
            os.replace(path, aside)
            return aside
    raise RunFileError(f"{path}: too many old copies beside it; clean them up")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` (relative POSIX path) with its size and sha256."""
    folder = Path(folder)
    return {
        file.relative_to(folder).as_posix(): {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
        for file in sorted(folder.rglob("*"))
        if file.is_file()
    }


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def completed(record: str | Path, key: str) -> dict[str, Any] | None:
    """The stage record at `record` if it exists and was written for fingerprint `key`, else None."""
    if not Path(record).is_file():
        return None
    found = read_json(record, "stage record")
    return found if isinstance(found, dict) and found.get("fingerprint") == key else None


def inside(root: str | Path, relative: str, what: str) -> Path:
    """`root / relative`, refusing a path that leaves `root` (absolute, `..`, or through a symlink)."""
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise RunFileError(f"{what} {relative!r} points outside {root}")
    return path
