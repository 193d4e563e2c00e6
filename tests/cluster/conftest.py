"""Fixtures of the cluster tests: free ports, and the environment a Ray cluster of this machine starts with."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_job_server(url: str, timeout_s: float = 60) -> None:
    """The job server comes up a little after the head node."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            JobSubmissionClient(url).list_jobs()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def cluster_env() -> Iterator[None]:
    """Token authentication on (as on the cloud clusters), and `raygpt` on PATH for job entrypoints."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "PATH")}
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    yield
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
