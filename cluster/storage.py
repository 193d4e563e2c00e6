"""Where run files live: a local path or an object-storage URI (`s3://bucket/prefix`, `gs://bucket/prefix`), read and
written through one file-system layer — pyarrow.fs, the layer Ray Data and Ray Train already use (Ray Train gets the
very same file system object: `RunConfig(storage_filesystem=...)`).

    python -m cluster.storage check s3://my-bucket/runs/demo     # can this machine reach, list and write there?
    python -m cluster.storage cat s3://my-bucket/runs/demo/data/train/shard-000000.tar > shard.tar

A `Location` is a `Path` (local) or a `str` URI. Local writes go through `cluster.files` (temp name + rename); on
object storage one object is written by one PUT (a multipart upload is visible only once it completes), so a reader
sees the old object or the new one, never half of one. Folders on object storage are not atomic: what counts is the
record each stage writes last (the manifest, a commit record, a stage record), exactly as for local runs.

Credentials come only from the environment: AWS_* variables, AWS_PROFILE, web identity or the instance profile for
s3://; GOOGLE_APPLICATION_CREDENTIALS or the metadata server for gs:// — never from a file in the repository or the
run. AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) points s3:// at an S3-compatible store (MinIO, Ceph, the tests' local
server). Errors become one line: unknown bucket, missing credentials, access denied, unreachable endpoint (after
`ATTEMPTS` tries with `CONNECT_TIMEOUT_S` each).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs

from cluster.files import RunFileError, atomic_folder, atomic_stream, atomic_write, parse_json, remove, sha256_file
from cluster.layout import Location, is_uri

ATTEMPTS = 3
"""Tries per request before an object-storage error is final (the AWS SDK's standard retry strategy)."""
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 60.0
SCHEMES = ("s3", "gs")


class StorageError(RunFileError):
    """Object storage that cannot be used: one line naming the location and what is wrong."""


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _check_s3_credentials() -> None:
    """botocore's credential chain is the AWS SDK's (environment, profile, web identity, container, instance
    profile). Without any, the AWS SDK in pyarrow would send unsigned requests; say so instead."""
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise StorageError("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           "AWS_PROFILE, or run on a node with an instance profile)")


def _check_gcs_credentials() -> None:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError:
        raise StorageError("no Google Cloud credentials found (set GOOGLE_APPLICATION_CREDENTIALS or run on a "
                           "node with a service account)") from None


@functools.cache
def _s3(bucket: str, endpoint: str | None, region: str | None, keys: tuple[str | None, ...]) -> pafs.S3FileSystem:
    del keys  # part of the cache key only: other credentials in the environment are another file system
    _check_s3_credentials()
    scheme = "https"
    if endpoint and "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
    if region is None and endpoint is None:
        try:
            region = pafs.resolve_s3_region(bucket)
        except OSError as e:
            raise _one_line(f"s3://{bucket}", e) from None
    return pafs.S3FileSystem(
        region=region or "us-east-1", endpoint_override=endpoint, scheme=scheme, connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=REQUEST_TIMEOUT_S, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS),
    )


@functools.cache
def _gcs() -> pafs.GcsFileSystem:
    _check_gcs_credentials()
    return pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=REQUEST_TIMEOUT_S))


def filesystem(loc: Location) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) of a location; the same object for every location of one bucket."""
    if not is_uri(loc):
        return pafs.LocalFileSystem(), str(Path(loc).absolute())
    scheme, rest = str(loc).split("://", 1)
    bucket = rest.split("/", 1)[0]
    if scheme not in SCHEMES or not bucket:
        raise StorageError(f"{loc}: unsupported location; use a local path, s3://bucket/... or gs://bucket/...")
    try:
        if scheme == "s3":
            env = os.environ
            keys = (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"), env.get("AWS_PROFILE"))
            fs = _s3(bucket, _endpoint(), env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"), keys)
        else:
            fs = _gcs()
    except StorageError as e:
        raise StorageError(f"{loc}: {e}") from None
    return fs, rest.rstrip("/")


def _one_line(loc: Location, error: OSError) -> StorageError:
    """An object-storage error as one line a person can act on."""
    text = str(error)
    bucket = str(loc).split("://", 1)[-1].split("/", 1)[0]
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower() or "NotFound" in text and "bucket" in text.lower():
        return StorageError(f"{loc}: bucket {bucket!r} does not exist (or is not visible with these credentials)")
    if any(s in text for s in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden")):
        return StorageError(f"{loc}: access denied by the object store (check the credentials' permissions)")
    if any(s in text.lower() for s in ("couldn't connect", "connection refused", "timeout", "timed out", "curlcode",
                                       "could not resolve", "network")):
        where = _endpoint() or "the object store"
        return StorageError(f"{loc}: cannot reach {where} (gave up after {ATTEMPTS} attempts)")
    return StorageError(f"{loc}: object storage error: {text.splitlines()[0] if text else type(error).__name__}")


@contextmanager
def _errors(loc: Location) -> Iterator[None]:
    """Object-storage failures as one-line StorageErrors; a missing object stays FileNotFoundError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        if not is_uri(loc):
            raise
        raise _one_line(loc, e) from None


def info(loc: Location) -> pafs.FileInfo:
    fs, path = filesystem(loc)
    with _errors(loc):
        return fs.get_file_info(path)


def is_file(loc: Location) -> bool:
    return info(loc).type == pafs.FileType.File


def is_dir(loc: Location) -> bool:
    """A folder (on object storage: a prefix with at least one object under it)."""
    if not is_uri(loc):
        return Path(loc).is_dir()
    return bool(listdir(loc))


def size(loc: Location) -> int | None:
    """Bytes of a file or object, None when there is none."""
    found = info(loc)
    return found.size if found.type == pafs.FileType.File else None


def listdir(loc: Location) -> list[str]:
    """Names directly under a folder or prefix (empty when there is none)."""
    fs, path = filesystem(loc)
    with _errors(loc):
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def files_under(loc: Location) -> dict[str, int]:
    """Every file under a folder or prefix: relative POSIX path → size."""
    fs, path = filesystem(loc)
    with _errors(loc):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}


def stamps_under(loc: Location) -> dict[str, list[int]]:
    """Every file under a folder or prefix: relative POSIX path → [size, modification time in ns]."""
    fs, path = filesystem(loc)
    with _errors(loc):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1 :]: [i.size, i.mtime_ns or 0] for i in infos if i.type == pafs.FileType.File}


def read_bytes(loc: Location) -> bytes:
    if not is_uri(loc):
        return Path(loc).read_bytes()
    fs, path = filesystem(loc)
    with _errors(loc), fs.open_input_stream(path) as f:
        return f.read()


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode("utf-8")


@contextmanager
def open_read(loc: Location, buffer_size: int = 1 << 20) -> Iterator[IO[bytes]]:
    """A sequential binary stream (buffered `buffer_size` bytes ahead on object storage): never the whole object."""
    if not is_uri(loc):
        with open(loc, "rb", buffering=buffer_size) as f:
            yield f
        return
    fs, path = filesystem(loc)
    with _errors(loc), fs.open_input_stream(path, buffer_size=buffer_size) as f:
        yield f  # type: ignore[misc]


def open_random(loc: Location) -> pa.NativeFile:
    """A random-access file (`read_at(nbytes, offset)`, safe to call from several threads): a local file, or an object
    read by ranged GETs. The caller closes it."""
    fs, path = filesystem(loc)
    with _errors(loc):
        return fs.open_input_file(path)


def write_bytes(loc: Location, data: bytes | str) -> Location:
    """Replace a file (atomically) or an object (one PUT) with `data`."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if not is_uri(loc):
        return atomic_write(loc, raw)
    fs, path = filesystem(loc)
    with _errors(loc), fs.open_output_stream(path) as f:
        f.write(raw)
    return loc


@contextmanager
def output(loc: Location) -> Iterator[IO[bytes]]:
    """A binary file whose contents replace `loc` when the block exits normally (and never otherwise): a local temp
    file renamed into place, or on object storage a local temp file uploaded in one PUT at the end (an output stream
    straight to the store would publish a half object when the writer fails, since closing completes the upload)."""
    if not is_uri(loc):
        with atomic_stream(loc) as f:
            yield f
        return
    with tempfile.NamedTemporaryFile(prefix="raygpt-upload-") as f:
        yield f  # type: ignore[misc]
        f.flush()
        upload(Path(f.name), loc)


def write_json(loc: Location, obj: Any) -> Location:
    return write_bytes(loc, json.dumps(obj, indent=2) + "\n")


def read_json(loc: Location, what: str = "file") -> Any:
    """A JSON file or object, or a one-line RunFileError naming it when it is missing or not valid JSON."""
    try:
        text = read_bytes(loc).decode("utf-8")
    except FileNotFoundError:
        raise RunFileError(f"{loc}: {what} not found") from None
    except UnicodeDecodeError:
        raise RunFileError(f"{loc}: unreadable {what} (not UTF-8)") from None
    return parse_json(text, loc, what)


def completed(record: Location, key: str) -> dict[str, Any] | None:
    """The stage record at `record` if it exists and was written for fingerprint `key`, else None (`cluster.files`'s
    one completion scheme, wherever the record lives)."""
    if not is_file(record):
        return None
    found = read_json(record, "stage record")
    return found if isinstance(found, dict) and found.get("fingerprint") == key else None


def delete(loc: Location) -> None:
    """Delete a file, object, folder or prefix (missing is fine)."""
    if not is_uri(loc):
        remove(loc)
        return
    fs, path = filesystem(loc)
    found = info(loc)
    with _errors(loc):
        if found.type == pafs.FileType.File:
            fs.delete_file(path)
        elif files_under(loc):
            fs.delete_dir(path)


def upload(local: Path, loc: Location) -> None:
    """One local file → a file or object (atomically replaced)."""
    if not is_uri(loc):
        with open(local, "rb") as f:
            atomic_write(loc, f.read())
        return
    upload_folder(local, loc)  # pyarrow's copy_files takes a file or a folder alike


def upload_folder(local: Path, loc: Location) -> None:
    """Every file under a local folder (or one file) → the same relative names under `loc` (objects beside them are
    left)."""
    fs, path = filesystem(loc)
    with _errors(loc):
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_folder(loc: Location, local: Path) -> None:
    fs, path = filesystem(loc)
    local.mkdir(parents=True, exist_ok=True)
    with _errors(loc):
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


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
        delete(loc)
        upload_folder(Path(tmp), loc)


def check(loc: Location) -> None:
    """Fail now, in one line, when a location on object storage cannot be listed (bucket, credentials, endpoint)."""
    if is_uri(loc):
        fs, path = filesystem(loc)
        bucket = path.split("/", 1)[0]
        with _errors(loc):
            found = fs.get_file_info(bucket)
        if found.type == pafs.FileType.NotFound:
            raise StorageError(f"{loc}: bucket {bucket!r} does not exist (or is not visible with these credentials)")
        listdir(loc)


def sha256(loc: Location) -> str:
    if not is_uri(loc):
        return sha256_file(loc)
    digest = hashlib.sha256()
    with open_read(loc) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    command, where = sys.argv[1], sys.argv[2]
    if command == "check":
        check(where)
        probe = f"{str(where).rstrip('/')}/.raygpt-write-probe"
        write_bytes(probe, b"ok")
        delete(probe)
        print(f"{where}: reachable, listable and writable")
    elif command == "cat":
        with open_read(where) as stream:
            while chunk := stream.read(1 << 20):
                sys.stdout.buffer.write(chunk)
