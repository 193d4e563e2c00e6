"""The run's metrics on rank 0 of `raygpt train` (trainer/loop.py): the local metrics.jsonl / TensorBoard mirror of a
run on object storage (fetched on resume, uploaded at checkpoints) and the `data_digest` of a global batch.
Used by `raygpt train CONFIG` workers; not run by hand.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from core import files
from core.files import atomic_write, remove
from core.layout import RunLayout

if TYPE_CHECKING:
    from trainer.data import StepData


def sample_digests(data: StepData) -> list[bytes]:
    """One short digest per sample of this rank's slice, in order."""
    return [hashlib.blake2b(np.ascontiguousarray(block).tobytes(), digest_size=8).digest()
            for blocks in data.micro_batches for block in blocks]


def memory() -> tuple[float, float]:
    """This process's resident memory now and at its peak, in GiB (Linux /proc; (0, 0) where there is none)."""
    try:
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        return int(status["VmRSS"].split()[0]) / 2**20, int(status["VmHWM"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return 0.0, 0.0


def batch_digest(per_rank: list[list[bytes]]) -> str:
    """A digest of a global batch's samples in global order (the ranks' slices in rank order): equal for equal data
    at any world size. Logged as `data_digest`, so two runs can be checked to have trained on the same samples."""
    return hashlib.blake2b(b"".join(d for digests in per_rank for d in digests), digest_size=8).hexdigest()


def continue_metrics(layout: RunLayout, step: int | None) -> None:
    """Rank 0 at the start: for a run on object storage, fetch the run's metrics and TensorBoard into the local
    mirror (this node may not have written them); on resume (`step`), drop metric lines of steps after the resumed
    one (they are about to be run again)."""
    if layout.remote:
        remove(layout.metrics_local)
        remove(layout.tensorboard_local)
        layout.scratch.mkdir(parents=True, exist_ok=True)
        if step is not None and files.is_file(layout.metrics):
            atomic_write(layout.metrics_local, files.read_bytes(layout.metrics))
        if step is not None and files.is_dir(layout.tensorboard):
            files.download_folder(layout.tensorboard, layout.tensorboard_local)
    if layout.metrics_local.is_file():  # a fresh start keeps none: a killed first attempt's steps are run again
        kept = [row for row in read_metrics(layout.metrics_local.read_text()) if step is not None and row["step"] <= step]
        atomic_write(layout.metrics_local, "".join(json.dumps(row) + "\n" for row in kept))


def read_metrics(text: str) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl: a line that is not a JSON object with an integer step (the torn last line of a
    killed run) is dropped, and of two rows of one step the later wins (each step is logged once)."""
    rows: dict[int, dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows[row["step"]] = row
    return [rows[step] for step in sorted(rows)]


def metrics_length(layout: RunLayout) -> int | None:
    """Rank 0, between steps: the bytes of whole lines in the local metrics mirror now (None where there is none)."""
    return layout.metrics_local.stat().st_size if layout.remote and layout.metrics_local.is_file() else None


def upload_metrics(layout: RunLayout, length: int | None = None) -> None:
    """Rank 0, for a run on object storage: the local metrics and TensorBoard mirror replace the run's copy (object
    stores do not append). Called at every checkpoint and at the end. `length` (from `metrics_length`, taken between
    steps) uploads only that prefix: a checkpoint written in the background must not copy a line being appended."""
    if layout.remote:
        if length is not None:
            with open(layout.metrics_local, "rb") as f, files.output(layout.metrics) as out:
                out.write(f.read(length))
        elif layout.metrics_local.is_file():
            files.upload(layout.metrics_local, layout.metrics)
        if layout.tensorboard_local.is_dir():
            files.upload_folder(layout.tensorboard_local, layout.tensorboard)
