"""Shared fixtures: the shared test data folder, one local Ray for the whole session, helpers to run the CLI.

    make test      (= .venv/bin/python -m pytest tests)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """RAYGPT_SHARED_DATA, else ../shared/data beside the repository (see DEVELOPERS.md)."""
    configured = os.environ.get("RAYGPT_SHARED_DATA")
    path = Path(configured) if configured else REPO.parent / "shared" / "data"
    if not (path / "tinyshakespeare" / "input.txt").is_file():
        raise RuntimeError(f"shared test data not found at {path}: set RAYGPT_SHARED_DATA to the shared/data folder")
    return path.resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session", autouse=True)
def _env(shared_data: Path) -> None:
    os.environ["RAYGPT_SHARED_DATA"] = str(shared_data)  # configs expand ${RAYGPT_SHARED_DATA}
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for every test that needs it (address='local' ignores stale cluster files)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
