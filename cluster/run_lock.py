"""One writer per run directory: every `raygpt` command that writes RUN_DIR holds an exclusive lock on RUN_DIR/.lock.

    raygpt train configs/demo.yaml      # holds runs/demo/.lock until it exits; a second writer is refused

`fcntl.flock` on the lock file: the kernel releases it when the holder exits, however it dies, so a crashed run never
blocks the next one. The holder writes its pid, host, command and start time into the file, and a refused command
names them. Read-only commands (`generate`, `export`) take no lock. A run_dir on object storage (a URI) is not locked
here. flock is advisory and per host on most network file systems: it keeps two local commands apart.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.config import ConfigError
from cluster.layout import RunLayout

class RunLocked(ConfigError):
    """Another process holds the run directory."""


@contextmanager
def run_lock(run_dir: str | Path, command: str) -> Iterator[None]:
    """Hold RUN_DIR/.lock for the duration of the block; refuse with one line if another process holds it."""
    if "://" in str(run_dir):
        yield
        return
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(RunLayout.of(folder).lock, os.O_RDWR | os.O_CREAT, 0o644)
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
