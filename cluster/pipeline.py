"""The stages of a raygpt run and the main job that chains them: `raygpt run CONFIG` (prepare → ...).

    raygpt run configs/demo.yaml

Each stage is skipped when its outputs are complete for the same config, so re-running after a failure continues
where it stopped. Later stages (train, eval, quantize, sample) join the chain as they land.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pathlib import Path

from ray.train import ScalingConfig

from cluster.config import RunConfig, save_resolved
from cluster.ray_connect import connect
from data_pipeline.prepare import prepare
from evaluation.quantize import run_quantize
from evaluation.run import run_eval
from trainer.driver import check_data, check_model, train


def run_prepare(cfg: RunConfig) -> dict[str, Any]:
    """Corpus → tokenizer + webdataset shards in RUN_DIR/data."""
    num_cpus = connect(cfg.cluster)
    save_resolved(cfg)
    return prepare(cfg.data, cfg.data_dir, num_cpus)


def run_train(cfg: RunConfig, fail_at_step: int | None = None) -> Any:
    """Shards → checkpoints (resuming from the newest one in storage). Everything checkable fails before workers start."""
    manifest = check_data(cfg.data_dir)
    model_cfg = cfg.model.resolve(vocab_size=manifest["vocab_size"], block_size=manifest["seq_len"])
    check_model(manifest, model_cfg)
    connect(cfg.cluster)
    save_resolved(cfg)
    c = cfg.cluster
    scaling = ScalingConfig(
        num_workers=c.num_workers,
        use_gpu=c.use_gpu,
        resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})},
        placement_strategy=c.placement_strategy,
    )
    storage = c.storage_path or str((Path(cfg.run_dir) / "train").resolve())
    return train(
        cfg.train, model_cfg, cfg.data_dir, Path(cfg.run_dir), cfg.seed, scaling, storage, c.max_failures,
        c.num_to_keep, manifest["eot_token"], fail_at_step,
    )


def run_evaluation(cfg: RunConfig) -> dict[str, Any]:
    """Checkpoints → RUN_DIR/eval/results.json + report.md, one Ray task per checkpoint."""
    connect(cfg.cluster)
    save_resolved(cfg)
    return run_eval(cfg.eval, Path(cfg.run_dir), cfg.data_dir)


def run_quantization(cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint → RUN_DIR/quantized/<method>/ for every configured method + report vs full precision."""
    connect(cfg.cluster)
    save_resolved(cfg)
    return run_quantize(cfg.quantize, cfg.eval, Path(cfg.run_dir), cfg.data_dir)


STAGES: dict[str, Callable[[RunConfig], Any]] = {
    "prepare": run_prepare, "train": run_train, "eval": run_evaluation, "quantize": run_quantization,
}


def run(cfg: RunConfig) -> None:
    """The main job: every stage in order."""
    for name, stage in STAGES.items():
        print(f"[run] stage {name}", flush=True)
        stage(cfg)
