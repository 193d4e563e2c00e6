"""The stages of a raygpt run and the main job that chains them: `raygpt run CONFIG` (prepare → ...).

    raygpt run configs/demo.yaml

Each stage is skipped when its outputs are complete for the same config, so re-running after a failure continues
where it stopped. Later stages (train, eval, quantize, sample) join the chain as they land.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cluster.config import RunConfig, save_resolved
from cluster.ray_connect import connect
from data_pipeline.prepare import prepare


def run_prepare(cfg: RunConfig) -> dict[str, Any]:
    """Corpus → tokenizer + webdataset shards in RUN_DIR/data."""
    num_cpus = connect(cfg.cluster)
    save_resolved(cfg)
    return prepare(cfg.data, cfg.data_dir, num_cpus)


STAGES: dict[str, Callable[[RunConfig], Any]] = {"prepare": run_prepare}


def run(cfg: RunConfig) -> None:
    """The main job: every stage in order."""
    for name, stage in STAGES.items():
        print(f"[run] stage {name}", flush=True)
        stage(cfg)
