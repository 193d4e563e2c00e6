"""One writer per run directory: every `raygpt` command that writes RUN_DIR holds an exclusive lock on RUN_DIR/.lock.

    raygpt train configs/demo.yaml      # holds runs/demo/.lock until it exits; a second writer is refused

`fcntl.flock` on the lock file: the kernel releases it when the holder exits, however it dies, so a crashed run never
blocks the next one. The holder writes its pid, host, command and start time into the file, and a refused command
names them. Read-only commands (`generate`, `export`) take no lock. flock is advisory and per host on most network
file systems: it keeps two local commands apart.

A run_dir on object storage is locked by a lease object, RUN_DIR/.lock, created with a conditional PUT
(`If-None-Match: *`: exactly one of two concurrent writers succeeds) and renewed every `LEASE_S / 4` by a background
thread (`If-Match` on the ETag it holds). A holder that dies stops renewing: its lease expires after `LEASE_S` and the
next command takes it over (again conditionally). Where the store refuses conditional writes (older S3-compatible
servers) or for gs:// (not implemented), the command says so in one line and runs unlocked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cluster.config import ConfigError
from core.errors import StorageError
from core.layout import RunLayout, is_uri

LEASE_S = 60.0
"""Lifetime of a lease on object storage; its holder renews it every LEASE_S / 4."""

class RunLocked(ConfigError):
    """Another process holds the run directory."""


@contextmanager
def run_lock(run_dir: str | Path, command: str) -> Iterator[None]:
    """Hold RUN_DIR/.lock for the duration of the block; refuse with one line if another process holds it."""
    if is_uri(run_dir):
        with _lease(str(run_dir), command):
            yield
        return
    folder = Path(run_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder; choose another run_dir")
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLayout.of(folder).lock
    try:  # never through a symlink: a link planted as .lock would have its target truncated and overwritten
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if os.path.islink(lock):
            raise ConfigError(f"{lock} is a symlink; remove it (raygpt's lock is a plain file)") from None
        raise ConfigError(f"{lock}: cannot be opened ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", errors="replace").strip()
            try:
                who = json.loads(holder)
                named = f"pid {who['pid']} on {who['host']} ({who['command']}, since {who['since']})"
            except (ValueError, KeyError, TypeError):
                named = "another process"
            raise RunLocked(f"{folder} is in use by {named}; wait for it to finish or choose another run_dir") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


@contextmanager
def run_locks(layout: RunLayout, command: str) -> Iterator[None]:
    """The run directory's lock, and when `cluster.storage_path` puts the checkpoints elsewhere, the same lock on
    that folder: two runs sharing it could otherwise move each other's checkpoints away (`train.resume=false`)."""
    with run_lock(layout.run_dir, command):
        if _same(layout.storage, layout.run_dir):
            yield
            return
        with run_lock(layout.storage, command):
            yield


def _same(a: str | Path, b: str | Path) -> bool:
    if is_uri(a) or is_uri(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _holder(command: str) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "owner": os.urandom(8).hex()}


def _named(who: dict[str, Any]) -> str:
    return f"pid {who.get('pid')} on {who.get('host')} ({who.get('command')}, since {who.get('since')})"


@contextmanager
def _lease(run_dir: str, command: str) -> Iterator[None]:
    """Hold the lease object RUN_DIR/.lock on object storage for the duration of the block."""
    from core import files

    files.check(run_dir)  # bucket, credentials and endpoint: one line each
    if not run_dir.startswith("s3://"):
        print(f"[lock] warning: {run_dir} is not locked (leases are implemented for s3:// only); make sure no other "
              "command writes this run", flush=True)
        yield
        return
    from botocore.exceptions import ClientError

    bucket, _, key = str(RunLayout.of(run_dir).lock).split("://", 1)[1].partition("/")
    client = files.s3_client()
    me = _holder(command)

    def put(condition: dict[str, str]) -> str:
        body = json.dumps({**me, "expires": time.time() + LEASE_S}).encode()
        return str(client.put_object(Bucket=bucket, Key=key, Body=body, **condition)["ETag"])

    def code(error: ClientError) -> str:
        return str(error.response.get("Error", {}).get("Code", ""))

    try:
        etag = put({"IfNoneMatch": "*"})
    except ClientError as e:
        if code(e) in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
            print(f"[lock] warning: {run_dir}: the object store refuses conditional writes, so this run is not locked; "
                  "make sure no other command writes it", flush=True)
            yield
            return
        if code(e) not in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise StorageError(f"{run_dir}: cannot create the run lock ({code(e) or e})") from None
        current = client.get_object(Bucket=bucket, Key=key)
        who = json.loads(current["Body"].read() or b"{}")
        if float(who.get("expires", 0)) > time.time():
            raise RunLocked(f"{run_dir} is in use by {_named(who)}; wait for it to finish or choose another run_dir") from None
        try:  # an expired lease (its holder died): take it over unless someone else just did
            etag = put({"IfMatch": current["ETag"]})
        except ClientError:
            raise RunLocked(f"{run_dir}: another command took over an expired lock just now; try again") from None
        print(f"[lock] took over the expired lock of {_named(who)}", flush=True)
    stop = threading.Event()

    def renew() -> None:
        nonlocal etag
        while not stop.wait(LEASE_S / 4):
            try:
                etag = put({"IfMatch": etag})
            except ClientError:
                print(f"[lock] warning: lost the lock on {run_dir}: another command took it over", flush=True)
                return

    thread = threading.Thread(target=renew, name="run-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            current = client.get_object(Bucket=bucket, Key=key)
            if json.loads(current["Body"].read() or b"{}").get("owner") == me["owner"]:
                client.delete_object(Bucket=bucket, Key=key)
        except ClientError:
            pass  # already gone or taken over: nothing of ours to release
