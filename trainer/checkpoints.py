"""Training checkpoints and their commit protocol: versioned folders in Ray Train storage that count only once a commit
record, written last, says every rank's files arrived — and are verified against that record before anything in them
is read (nothing in them is a pickle).

    python -m trainer.checkpoints runs/demo        # lists the committed checkpoints of a run and verifies the newest

    STORAGE/checkpoints/step-000120/      STORAGE is RUN_DIR or cluster.storage_path (a local path or a URI)
      state/index.json                    step, Adam's step, shapes, who holds which fragment (`trainer.state`)
      state/rank-R.safetensors            rank R's fragments of the fp32 weights and Adam moments
      model/                              the consolidated model (rank 0): what RUN_DIR/checkpoint points to
      commit.json                         step, run fingerprint, world size, size and sha256 of every file above

The protocol (`trainer.checkpointer`, in the background unless train.checkpoint_async is false): every rank writes
its files into `step-N/` (each file whole or not at all); the file records of all ranks are gathered on rank 0, and
only when every rank's files are there does rank 0 write `commit.json` (atomically). Then RUN_DIR/checkpoint is
re-pointed at the new model (one rename) and checkpoints beyond `train.keep_checkpoints` are deleted — never the
previous committed one before the new commit exists. A folder without a commit record (a crash mid-save) is ignored
and later removed.

The run fingerprint (`run_fingerprint`) names everything that determines the training trajectory; resuming with
another fingerprint is refused with the keys that differ. Extending max_steps or time_budget_s is allowed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from core import files
from core.errors import RunFileError
from core.files import atomic_write, fingerprint, move_aside, point, remove, sha256
from core.layout import RunLayout, step_name, step_of
from data_pipeline.manifest import Manifest
from model.checkpoint import pointer
from model.gpt import ModelConfig
from trainer.config import TrainConfig

RECORD_VERSION = 2
"""Version 2: resharding state (`trainer.state`) instead of version 1's DeepSpeed files per rank."""
TRAJECTORY_FIELDS = ("lr", "min_lr", "warmup_steps", "weight_decay", "betas", "grad_clip", "precision", "deepspeed")
"""The train settings that change the trajectory. Not: max_steps, time_budget_s, the cadences, and — since every
world size trains on the same global batches — micro_batch_size, zero_stage and offloading (they change rounding)."""


def run_fingerprint(train: TrainConfig, model: ModelConfig, manifest: Manifest, seed: int, global_batch_size: int) -> dict[str, Any]:
    """Everything that determines the training trajectory, as flat `section.key` → value."""
    t = train.model_dump(mode="json")
    shards = [s.sha256 for split in manifest.splits.values() for s in split.shards]
    return {
        **{f"train.{k}": t[k] for k in TRAJECTORY_FIELDS},
        "train.global_batch_size": global_batch_size,
        **{f"model.{k}": v for k, v in model.model_dump(mode="json").items()},
        "data.fingerprint": manifest.fingerprint,
        "data.shards": fingerprint(shards),
        "seed": seed,
    }


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key old → new` for every key whose value differs (json-normalised, so tuples equal lists)."""
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731
    return [f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new)) if norm(old.get(k)) != norm(new.get(k))]


@dataclass(frozen=True)
class Committed:
    """A committed training checkpoint: its step, location (path or URI) and commit record."""

    step: int
    location: str
    record: dict[str, Any]


def _fs(location: str) -> tuple[pafs.FileSystem, str]:
    return files.filesystem(location)


def _read_record(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(f"{path}/{RunLayout.COMMIT}") as f:
            raw = f.read()
    except (FileNotFoundError, OSError):
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        raise RunFileError(f"{path}/{RunLayout.COMMIT}: corrupt commit record; move that checkpoint away") from None
    if isinstance(record, dict) and record.get("version") == 1:
        raise RunFileError(f"{path}: a checkpoint of an older raygpt (DeepSpeed files by rank), which this one cannot "
                           "resume; use a new run_dir (its model folder still works for eval, export and generate)")
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        return None
    if problem := _record_problem(record):
        raise RunFileError(f"{path}/{RunLayout.COMMIT}: {problem}; move that checkpoint away")
    return record


def _record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a commit record's shape (it is read before anything it names), or None."""
    if not isinstance(record.get("step"), int) or isinstance(record["step"], bool) or record["step"] < 0:
        return "'step' is not a step number"
    if not isinstance(record.get("world_size"), int) or not 0 < record["world_size"] <= 1 << 20:
        return "'world_size' is not a worker count"
    if not isinstance(record.get("fingerprint"), dict):
        return "no 'fingerprint' mapping"
    entries = record.get("files")
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        return "no 'files' mapping of file records"
    return None


def step_folders(layout: RunLayout) -> dict[int, str]:
    """Every step-N folder in storage (committed or not), by step."""
    fs, root = _fs(layout.checkpoints)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    scheme = layout.checkpoints.split("://", 1)[0] + "://" if layout.remote_storage else ""
    return {
        step: f"{scheme}{info.path}"
        for info in infos
        if info.type == pafs.FileType.Directory and (step := step_of(info.base_name)) is not None
    }


def committed(layout: RunLayout) -> list[Committed]:
    """The committed checkpoints, oldest first."""
    fs, _ = _fs(layout.checkpoints)
    found = []
    for step, location in sorted(step_folders(layout).items()):
        record = _read_record(fs, _fs(location)[1])
        if record is not None and record.get("step") == step:
            found.append(Committed(step, location, record))
    return found


def newest(layout: RunLayout) -> Committed | None:
    found = committed(layout)
    return found[-1] if found else None


def commit(layout: RunLayout, step: int, run_fp: dict[str, Any], world_size: int, records: dict[str, Any]) -> dict[str, Any]:
    """Write the commit record of `step` (last, atomically): from now on the checkpoint counts."""
    record = {"version": RECORD_VERSION, "step": step, "fingerprint": run_fp, "world_size": world_size,
              "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": records}
    text = json.dumps(record, indent=2) + "\n"
    location = layout.checkpoint_dir(step)
    if layout.remote_storage:  # an object store's put is atomic
        fs, path = _fs(location)
        with fs.open_output_stream(f"{path}/{RunLayout.COMMIT}") as f:
            f.write(text.encode())
    else:
        atomic_write(Path(location) / RunLayout.COMMIT, text)
    return record


def publish(layout: RunLayout, step: int, record: dict[str, Any]) -> None:
    """Point RUN_DIR/checkpoint at the model of a committed step: a symlink swapped in one rename, or for a run on
    object storage a pointer object (one PUT) naming the model folder and its files' hashes from the commit record."""
    if not layout.remote:
        point(layout.checkpoint, layout.model_dir(step))
        return
    prefix = f"{RunLayout.MODEL}/"
    records = {k[len(prefix):]: v for k, v in record["files"].items() if k.startswith(prefix)}
    files.write_json(layout.checkpoint, pointer(step, layout.model_dir(step), records))


def verify(folder: Path, record: dict[str, Any]) -> None:
    """Every file of a local checkpoint folder against its commit record: the listing (`verify_listing`), then each
    file's sha256 (`python -m trainer.checkpoints`; a resume hashes only what each rank reads)."""
    verify_listing(str(folder), record)
    for name, want in record["files"].items():
        if sha256(folder / name) != want["sha256"]:
            raise RunFileError(f"{folder / name}: size or sha256 differs from the commit record; the checkpoint is corrupt")


def verify_listing(location: str, record: dict[str, Any]) -> None:
    """The files of a checkpoint folder (local or on object storage) against its commit record by listing alone: each
    one present with its size, none that the record does not list. The workers check the sha256 of every byte they
    read (`trainer.checkpointer`), so no process reads the whole state to resume."""
    expected: dict[str, dict[str, Any]] = record["files"]
    present = {k: v for k, v in files.files_under(location).items() if k != RunLayout.COMMIT}
    if extra := sorted(set(present) - set(expected)):
        raise RunFileError(f"{location}: {extra[0]} is not in the commit record; refusing to load this checkpoint")
    for name, want in expected.items():
        if name not in present:
            raise RunFileError(f"{location}: {name} is missing (listed in the commit record)")
        if present[name] != want["bytes"]:
            raise RunFileError(f"{location}/{name}: size or sha256 differs from the commit record; the checkpoint is corrupt")


def merge_files(per_rank: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The file records of every rank's part of one checkpoint (two ranks writing one name must agree)."""
    merged: dict[str, dict[str, Any]] = {}
    for records in per_rank:
        for name, info in records.items():
            if merged.setdefault(name, info) != info:
                raise RunFileError(f"two ranks wrote different {name} into one checkpoint")
    return merged


def remove_steps(layout: RunLayout, steps: list[int]) -> None:
    """Delete these step folders from storage (and their local model copies)."""
    folders = step_folders(layout)
    for step in steps:
        if step in folders:
            fs, path = _fs(folders[step])
            fs.delete_dir(path)
        if layout.remote_storage and not layout.remote:
            remove(layout.model_dir(step))  # the local copy of a model whose checkpoint is on object storage


def prune(layout: RunLayout, keep: int) -> None:
    """Keep the newest `keep` committed checkpoints; delete older ones and every uncommitted folder below the newest
    committed step (crashed saves)."""
    done = [c.step for c in committed(layout)]
    if not done:
        return
    kept = set(done[-keep:])
    remove_steps(layout, [s for s in step_folders(layout) if s not in kept and s < done[-1]])


def forget_ray_state(layout: RunLayout) -> None:
    """Delete Ray Train's own checkpoint list before a launch. The commit records are the truth about which
    checkpoints exist; Ray's snapshot still names the ones `prune` deleted, and its controller refuses to start on a
    run folder whose snapshot names a missing checkpoint. Without it Ray starts an empty list (raygpt never asks Ray
    for a checkpoint: `trainer.loop` resumes from the newest committed one)."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    fs, root = _fs(layout.checkpoints)
    path = f"{root}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def start_over(layout: RunLayout) -> list[Path]:
    """`train.resume=false`: move the checkpoints, metrics and TensorBoard of the run aside (never deleted)."""
    moved: list[Path] = []
    if layout.remote_storage and step_folders(layout):
        raise RunFileError(f"train.resume=false cannot move checkpoints on object storage ({layout.checkpoints}); "
                           "choose a new run_dir or cluster.storage_path")
    if layout.remote:  # object stores cannot rename: never delete what another run wrote
        if any(files.is_file(f) for f in (layout.train_done, layout.checkpoint, layout.metrics)):
            raise RunFileError(f"train.resume=false cannot move a run's files on object storage ({layout.run_dir}); "
                               "choose a new run_dir")
        return moved
    remove(layout.train_done)
    if layout.checkpoint.is_symlink():
        remove(layout.checkpoint)  # a link into the checkpoints moved below
    for path in (Path(layout.checkpoints) if not layout.remote_storage else None, layout.models, layout.checkpoint,
                 layout.metrics, layout.tensorboard):
        if path is not None and path.exists():
            moved.append(move_aside(path, "old"))
    return moved


if __name__ == "__main__":
    run = RunLayout.of(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    found = committed(run)
    for c in found:
        print(f"{step_name(c.step)}  world {c.record['world_size']}  {len(c.record['files'])} files  {c.location}")
    if found and not run.remote_storage:
        verify(Path(found[-1].location), found[-1].record)
        print(f"{step_name(found[-1].step)}: every file matches its commit record")
    print(f"{len(found)} committed checkpoint(s) in {run.checkpoints}")
