"""The object-storage side of `core.files`: one pyarrow file system per bucket (s3:// or gs://), credentials from the
environment only, and every object-storage failure turned into one line. Only `core.files` imports it; everything
else reads and writes through that one front door.

    python -m core.files check s3://my-bucket/runs/demo     # can this machine reach, list and write there?

pyarrow is the layer Ray Data and Ray Train already use (Ray Train gets the very same file system object:
`RunConfig(storage_filesystem=...)`), imported only when a location is used, so that the CLI starts without it.
Credentials come only from the environment: AWS_* variables, AWS_PROFILE, web identity or the instance profile for
s3://; GOOGLE_APPLICATION_CREDENTIALS or the metadata server for gs:// — never from a file in the repository or the
run. AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) points s3:// at an S3-compatible store (MinIO, Ceph, the tests' local
server). Errors become one line: unknown bucket, missing credentials, access denied, unreachable endpoint (after
`ATTEMPTS` tries with `CONNECT_TIMEOUT_S` each).
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from core.errors import StorageError
from core.layout import Location, is_uri

ATTEMPTS = 3
"""Tries per request before an object-storage error is final (the AWS SDK's standard retry strategy)."""
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 60.0
SCHEMES = ("s3", "gs")


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
            raise one_line(f"s3://{bucket}", e) from None
    return pafs.S3FileSystem(
        region=region or "us-east-1", endpoint_override=endpoint, scheme=scheme, connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=REQUEST_TIMEOUT_S, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS),
    )


def s3_client() -> object:
    """A boto3 S3 client with the same endpoint, retries and connect timeout as the pyarrow file systems: for what
    pyarrow cannot do (conditional writes: `cluster.run_lock`'s lease)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=_endpoint(), config=Config(
        retries={"max_attempts": ATTEMPTS, "mode": "standard"}, connect_timeout=CONNECT_TIMEOUT_S))


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


def one_line(loc: Location, error: OSError) -> StorageError:
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
def translated(loc: Location) -> Iterator[None]:
    """Object-storage failures as one-line StorageErrors; a missing object stays FileNotFoundError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        if not is_uri(loc):
            raise
        raise one_line(loc, e) from None


