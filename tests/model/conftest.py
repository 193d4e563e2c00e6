"""Fixtures of the model tests: a small tokenizer and checkpoints of both exportable architectures."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.checkpoint import save_checkpoint
from tests.conftest import ARCHS, perturbed_model


@pytest.fixture(scope="session", params=list(ARCHS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_file: Path) -> Path:
    folder = tmp_path_factory.mktemp(request.param) / "checkpoint"
    return save_checkpoint(perturbed_model(request.param), folder, tokenizer_file)
