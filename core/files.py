"""The one front door for files: every read and write raygpt does under a run directory (or any cache) goes through
here, and every function takes a local path or an object-storage URI (`s3://bucket/prefix`, `gs://bucket/prefix`).

    python -m core.files check s3://my-bucket/runs/demo     # can this machine reach, list and write there?
    python -m core.files cat s3://my-bucket/runs/demo/data/train/shard-000000.tar > shard.tar

Writes are atomic. A local write goes to a unique temp name in the destination's own folder (`.NAME.<random>.tmp`, so
concurrent writers never share one), is flushed and fsynced, renamed over the destination, and the folder is fsynced
so the rename survives a power cut; on object storage one object is written by one PUT (a multipart upload is visible
only once it completes). A reader therefore sees the old file or the new one, never half of one. Local folders are
built under a unique temp name and renamed into place; a published "latest" is a symlink swapped with one rename.
Folders on object storage are not atomic: what counts is the record each stage writes last.

A stage is complete when its record (written last, atomically) carries the fingerprint of what produced it:
`completed(record, fingerprint)` is the one test every stage uses to skip work that is already done.

Ground floor: standard library only at import time; pyarrow (`core.object_store`) is imported when a URI is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from core.errors import RunFileError, StorageError, shown
from core.layout import Location, is_uri

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs


# -- object storage (pyarrow, imported on first use) -----------------------------------------------------------------
def filesystem(loc: Location) -> tuple[pafs.FileSystem, str]:
    """(pyarrow file system, path inside it) of a location; the same object for every location of one bucket."""
    from core import object_store

    return object_store.filesystem(loc)


def s3_client() -> Any:
    """A boto3 S3 client on the same endpoint with the same retries (conditional writes, which pyarrow lacks)."""
    from core import object_store

    return object_store.s3_client()


@contextmanager
def _remote(loc: Location) -> Iterator[tuple[pafs.FileSystem, str]]:
    """The file system and path of `loc`, with its failures turned into one-line StorageErrors."""
    from core import object_store

    fs, path = object_store.filesystem(loc)
    with object_store.translated(loc):
        yield fs, path


def check(loc: Location) -> None:
    """Fail now, in one line, when a location on object storage cannot be listed (bucket, credentials, endpoint)."""
    if not is_uri(loc):
        return
    with _remote(loc) as (fs, path):
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type.name == "NotFound":
            raise StorageError(f"{loc}: bucket {bucket!r} does not exist (or is not visible with these credentials)")
    listdir(loc)


# -- reading ---------------------------------------------------------------------------------------------------------
def info(loc: Location) -> pafs.FileInfo:
    """pyarrow's FileInfo of a file, object, folder or prefix (type, size, mtime)."""
    with _remote(loc) as (fs, path):
        return fs.get_file_info(path)


def is_file(loc: Location) -> bool:
    return Path(loc).is_file() if not is_uri(loc) else info(loc).type.name == "File"


def is_dir(loc: Location) -> bool:
    """A folder (on object storage: a prefix with at least one object under it)."""
    return Path(loc).is_dir() if not is_uri(loc) else bool(listdir(loc))


def size(loc: Location) -> int | None:
    """Bytes of a file or object, None when there is none."""
    if not is_uri(loc):
        return Path(loc).stat().st_size if Path(loc).is_file() else None
    found = info(loc)
    return found.size if found.type.name == "File" else None


def listdir(loc: Location) -> list[str]:
    """Names directly under a folder or prefix (empty when there is none)."""
    if not is_uri(loc):
        return sorted(p.name for p in Path(loc).iterdir()) if Path(loc).is_dir() else []
    import pyarrow.fs as pafs

    with _remote(loc) as (fs, path):
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def stamps_under(loc: Location) -> dict[str, list[int]]:
    """Every file under a folder or prefix: relative POSIX path → [size, modification time in ns]."""
    import pyarrow.fs as pafs

    with _remote(loc) as (fs, path):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1 :]: [i.size, i.mtime_ns or 0] for i in infos if i.type == pafs.FileType.File}


def files_under(loc: Location) -> dict[str, int]:
    """Every file under a folder or prefix: relative POSIX path → size."""
    return {name: stamp[0] for name, stamp in stamps_under(loc).items()}


def read_bytes(loc: Location) -> bytes:
    if not is_uri(loc):
        return Path(loc).read_bytes()
    with _remote(loc) as (fs, path), fs.open_input_stream(path) as f:
        return f.read()


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode("utf-8")


RECORD_LIMIT = 64 << 20
"""The largest JSON record raygpt reads (manifest, commit record, a checkpoint's config); a bigger file is refused."""


def read_json(loc: Location, what: str = "file", limit: int = RECORD_LIMIT) -> Any:
    """A JSON file or object; missing, unreadable, over `limit` bytes, too deep or not JSON: a one-line RunFileError."""
    try:
        if (found := size(loc)) is not None and found > limit:
            raise RunFileError(f"{loc}: {what} of {found:,} bytes is over the {limit:,} a record may have; not reading it")
        text = read_text(loc)
    except FileNotFoundError:
        raise RunFileError(f"{loc}: {what} not found") from None
    except UnicodeDecodeError:
        raise RunFileError(f"{loc}: unreadable {what} (not UTF-8)") from None
    except OSError as e:
        if is_uri(loc):
            raise
        raise RunFileError(f"{loc}: unreadable {what} ({type(e).__name__})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise RunFileError(f"{loc}: corrupt {what}, nested too deeply") from None
    except json.JSONDecodeError as e:
        raise RunFileError(f"{loc}: corrupt {what}, not valid JSON ({e.msg} at line {e.lineno}); delete it to redo") from None


@contextmanager
def open_read(loc: Location, buffer_size: int = 1 << 20) -> Iterator[IO[bytes]]:
    """A sequential binary stream (buffered `buffer_size` bytes ahead on object storage): never the whole object."""
    if not is_uri(loc):
        with open(loc, "rb", buffering=buffer_size) as f:
            yield f
        return
    with _remote(loc) as (fs, path), fs.open_input_stream(path, buffer_size=buffer_size) as f:
        yield f  # type: ignore[misc]


def open_random(loc: Location) -> pa.NativeFile:
    """A random-access file (`read_at(nbytes, offset)`, safe to call from several threads): a local file, or an object
    read by ranged GETs. The caller closes it."""
    with _remote(loc) as (fs, path):
        return fs.open_input_file(path)


def sha256(loc: Location) -> str:
    digest = hashlib.sha256()
    with open_read(loc) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Every file under a local `folder` (relative POSIX path) with its size and sha256."""
    folder = Path(folder)
    return {file.relative_to(folder).as_posix(): {"bytes": file.stat().st_size, "sha256": sha256(file)}
            for file in sorted(folder.rglob("*")) if file.is_file()}


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def completed(record: Location, key: str) -> dict[str, Any] | None:
    """The stage record at `record` if it exists and was written for fingerprint `key`, else None."""
    found = read_json(record, "stage record") if is_file(record) else None
    return found if isinstance(found, dict) and found.get("fingerprint") == key else None


def inside(root: str | Path, relative: str, what: str) -> Path:
    """`root / relative`, refusing a path that leaves `root` (absolute, `..`, or through a symlink)."""
    root = Path(root).resolve()
    if not (path := (root / relative).resolve()).is_relative_to(root):
        raise RunFileError(f"{what} {shown(relative)} points outside {root}")
    return path


# -- writing ---------------------------------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"


@contextmanager
def output(loc: Location) -> Iterator[IO[bytes]]:
    """A binary file whose contents replace `loc` when the block exits normally (and never otherwise): a local temp
    file renamed into place, or on object storage a local temp file uploaded in one PUT at the end (an output stream
    straight to the store would publish a half object when the writer fails, since closing completes the upload)."""
    if is_uri(loc):
        with tempfile.NamedTemporaryFile(prefix="raygpt-upload-") as f:
            yield f  # type: ignore[misc]
            f.flush()
            upload(Path(f.name), loc)
        return
    path = Path(loc)
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


def open_append(path: Path) -> IO[str]:
    """A local log (metrics.jsonl, console.log) opened to append lines; a symlink in its place is refused: a link
    planted under a run directory never redirects raygpt's writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        why = "a symlink where raygpt writes its own file; remove it" if path.is_symlink() else f"unwritable ({e.strerror})"
        raise RunFileError(f"{path}: {why}") from None
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


def atomic_write(loc: Location, data: bytes | str) -> Location:
    """Replace a file (atomically) or an object (one PUT) with `data` (str is written as UTF-8)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if is_uri(loc):
        with _remote(loc) as (fs, path), fs.open_output_stream(path) as f:
            f.write(raw)
        return loc
    with output(loc) as f:
        f.write(raw)
    return Path(loc)


def write_json(loc: Location, obj: Any) -> Location:
    return atomic_write(loc, json.dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_folder(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """A fresh local temp folder beside `path`, renamed to `path` when the block exits normally. An existing `path` is
    an error unless `replace`; then it is renamed aside first and deleted only once the new folder is in place."""
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


@contextmanager
def staged_folder(loc: Location) -> Iterator[Path]:
    """A fresh local folder whose contents become `loc` when the block exits normally: a local `loc` is replaced
    atomically (`atomic_folder`); on object storage the old prefix is deleted and the folder uploaded — the stage's
    record, written after, is what says it is complete."""
    if not is_uri(loc):
        with atomic_folder(loc, replace=True) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="raygpt-stage-") as tmp:
        yield Path(tmp)
        remove(loc)
        upload_folder(Path(tmp), loc)


def upload(local: Path, loc: Location) -> None:
    """One local file → a file (atomically replaced) or an object (one upload)."""
    if is_uri(loc):
        upload_folder(local, loc)  # pyarrow's copy_files takes a file or a folder alike
        return
    with open(local, "rb") as f, output(loc) as out:
        shutil.copyfileobj(f, out)


def upload_folder(local: Path, loc: Location) -> None:
    """Every file under a local folder (or one file) → the same names under `loc` (files beside them are left)."""
    import pyarrow.fs as pafs

    with _remote(loc) as (fs, path):
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_folder(loc: Location, local: Path) -> None:
    import pyarrow.fs as pafs

    local.mkdir(parents=True, exist_ok=True)
    with _remote(loc) as (fs, path):
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


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


def remove(loc: Location) -> None:
    """Delete a file, link, object, folder or prefix (missing is fine)."""
    if is_uri(loc):
        with _remote(loc) as (fs, path):
            if fs.get_file_info(path).type.name == "File":
                fs.delete_file(path)
            elif files_under(loc):
                fs.delete_dir(path)
        return
    path = Path(loc)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def move_aside(path: str | Path, label: str) -> Path:
    """Rename a local `path` to a new sibling `NAME.LABEL-N` (nothing is deleted); returns the new name."""
    path = Path(path)
    for n in range(1, 10_000):
        aside = path.with_name(f"{path.name}.{label}-{n}")
        if not aside.exists():
            os.replace(path, aside)
            return aside
    raise RunFileError(f"{path}: too many old copies beside it; clean them up")


if __name__ == "__main__":
    command, where = sys.argv[1], sys.argv[2]
    if command == "check":
        check(where)
        probe = f"{str(where).rstrip('/')}/.raygpt-write-probe"
        atomic_write(probe, b"ok")
        remove(probe)
        print(f"{where}: reachable, listable and writable")
    elif command == "cat":
        with open_read(where) as stream:
            while chunk := stream.read(1 << 20):
                sys.stdout.buffer.write(chunk)
