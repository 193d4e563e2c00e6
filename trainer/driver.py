"""`raygpt train CONFIG`: the Ray Train driver — checks everything it can before any worker starts, then runs
`train_loop_per_worker` on N DeepSpeed workers with `TorchTrainer`.

    raygpt train configs/demo.yaml train.max_steps=50 cluster.num_workers=2

Checkpoints go to Ray Train storage (`cluster.storage_path`, default RUN_DIR; a URI works) as
`checkpoints/step-N/`, committed by `trainer.checkpoints`. Re-running the same command resumes from the newest
committed checkpoint, after checking that it belongs to the same run (fingerprint) and is intact (commit record).
Worker failures are retried `cluster.max_failures` times, each time from the newest committed checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster import storage
from cluster.files import RunFileError
from cluster.layout import Location, RunLayout
from data_pipeline.config import DataError
from data_pipeline.manifest import Manifest, read_manifest
from model.gpt import ModelConfig
from trainer import checkpoints
from trainer.config import TrainConfig
from trainer.loop import train_loop_per_worker


def check_data(data_dir: Location, verify_hashes: bool = True) -> Manifest:
    """The manifest, after checking that every shard exists and is intact: size and sha256 for local data; on object
    storage size only — hashing there would download the corpus to the driver; the workers check each shard's sha256
    as they stream it."""
    manifest = read_manifest(data_dir)
    manifest.verify(data_dir, verify_hashes and not storage.is_uri(data_dir))
    return manifest


def check_model(manifest: Manifest, model_cfg: ModelConfig) -> None:
    """The model must cover the data's vocabulary exactly and its sequence length."""
    if manifest.vocab_size != model_cfg.vocab_size:
        raise DataError(
            f"model.vocab_size {model_cfg.vocab_size} ≠ the data's vocabulary {manifest.vocab_size} (tokenizer of the prepared data)"
        )
    if manifest.seq_len > model_cfg.block_size:
        raise DataError(f"data seq_len {manifest.seq_len} exceeds model.block_size {model_cfg.block_size}")


def check_resume(layout: RunLayout, run_fp: dict[str, Any]) -> checkpoints.Committed | None:
    """The committed checkpoint training will resume from, after checking it belongs to this very run (same
    fingerprint) and, in local storage, that its files match the commit record. Refused with one line otherwise."""
    if not layout.remote and Path(layout.checkpoint).exists() and not Path(layout.checkpoint).is_symlink():
        raise RunFileError(f"{layout.checkpoint} is a folder, not the link raygpt publishes (an older raygpt wrote it); "
                           "move it away or use a new run_dir")
    newest = checkpoints.newest(layout)
    if newest is None:
        return None
    if diffs := checkpoints.differences(newest.record["fingerprint"], run_fp):
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise RunFileError(
            f"{layout.run_dir} holds checkpoints of another training run ({shown}); use a new run_dir, or "
            "train.resume=false to start over (the old checkpoints are moved aside, not deleted)"
        )
    if not layout.remote_storage:  # workers verify their own copy again before loading
        checkpoints.verify(Path(newest.location), newest.record)
    return newest


def train(
    train_cfg: TrainConfig,
    model_cfg: ModelConfig,
    layout: RunLayout,
    seed: int,
    scaling: ScalingConfig,
    max_failures: int,
    eot_token: str,
    run_fp: dict[str, Any],
    faults: dict[str, int] | None = None,
) -> Any:
    """Run (or resume) training; returns Ray Train's Result. `faults` (tests only): exit_after_step kills the last
    worker once after that step; kill_before_commit SIGKILLs rank 0 between a checkpoint's files and its commit."""
    if not layout.remote:
        Path(layout.run_dir).mkdir(parents=True, exist_ok=True)
        layout = RunLayout(Path(layout.run_dir).resolve(), layout.storage)
    checkpoints.forget_ray_state(layout)
    # Ray Train uploads every rank's checkpoint through the same pyarrow file system as the rest of the run
    fs, storage_path = storage.filesystem(layout.storage) if layout.remote_storage else (None, layout.storage)
    loop_config = {
        "train": train_cfg.model_dump(mode="json"),
        "model": model_cfg.model_dump(mode="json"),
        "layout": layout,
        "seed": seed,
        "use_gpu": scaling.use_gpu,
        "eot_token": eot_token,
        "fingerprint": run_fp,
        "keep_checkpoints": train_cfg.keep_checkpoints,
        "faults": faults or {},
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=RunConfig(
            name=RunLayout.CHECKPOINTS,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # trainer.checkpoints prunes committed ones
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    return trainer.fit()

