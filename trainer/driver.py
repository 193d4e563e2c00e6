"""`raygpt train CONFIG`: the Ray Train driver — checks everything it can before any worker starts, then runs
`train_loop_per_worker` on N DeepSpeed workers with `TorchTrainer`.

    raygpt train configs/demo.yaml train.max_steps=50 cluster.num_workers=2

Checkpoints go to Ray Train storage (`cluster.storage_path`, default RUN_DIR/train; a URI works); re-running the same
command resumes from the newest complete checkpoint there (Ray Train restores its checkpoint manager from storage,
and only checkpoints every rank reported are registered). Worker failures are retried `cluster.max_failures` times,
each time from the last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from data_pipeline.config import DataError
from data_pipeline.shards import sha256_file
from model.gpt import ModelConfig
from trainer.config import TrainConfig
from trainer.loop import train_loop_per_worker


def check_data(data_dir: Path, verify_hashes: bool = True) -> dict[str, Any]:
    """The manifest, after checking that every shard exists and is intact (size and sha256)."""
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{data_dir}: no manifest.json (run `raygpt prepare` first)")
    manifest = json.loads(manifest_path.read_text())
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        if not shards:
            raise DataError(f"{data_dir}: the {split} split has no shards")
        for shard in shards:
            path = data_dir / shard["file"]
            if not path.is_file():
                raise DataError(f"missing shard {path}")
            if path.stat().st_size != shard["bytes"] or (verify_hashes and sha256_file(path) != shard["sha256"]):
                raise DataError(f"corrupt shard {path} (size or sha256 differs from the manifest)")
    return manifest


def check_model(manifest: dict[str, Any], model_cfg: ModelConfig) -> None:
    """The model must cover the data's vocabulary exactly and its sequence length."""
    if manifest["vocab_size"] != model_cfg.vocab_size:
        raise DataError(
            f"model.vocab_size {model_cfg.vocab_size} ≠ the data's vocabulary {manifest['vocab_size']} (tokenizer of the prepared data)"
        )
    if manifest["seq_len"] > model_cfg.block_size:
        raise DataError(f"data seq_len {manifest['seq_len']} exceeds model.block_size {model_cfg.block_size}")


def train(
    train_cfg: TrainConfig,
    model_cfg: ModelConfig,
    data_dir: Path,
    run_dir: Path,
    seed: int,
    scaling: ScalingConfig,
    storage_path: str,
    max_failures: int,
    num_to_keep: int,
    eot_token: str,
    fail_at_step: int | None = None,
) -> Any:
    """Run (or resume) training; returns Ray Train's Result. fail_at_step (tests only) kills the last worker once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    loop_config = {
        "train": train_cfg.model_dump(mode="json"),
        "model": model_cfg.model_dump(mode="json"),
        "data_dir": str(data_dir.resolve()),
        "run_dir": str(run_dir.resolve()),
        "seed": seed,
        "use_gpu": scaling.use_gpu,
        "eot_token": eot_token,
        "fail_at_step": fail_at_step,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=RunConfig(
            name="train",
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    return trainer.fit()
