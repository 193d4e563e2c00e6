"""Experiment tracking of a training run, on rank 0: TensorBoard, Weights & Biases and MLflow (`train.loggers`).

    raygpt train configs/demo.yaml "train.loggers=[tensorboard,wandb,mlflow]"      # WANDB_MODE=offline works offline

W&B and MLflow are set up through Ray's own integrations (`ray.air.integrations.wandb.setup_wandb`,
`...mlflow.setup_mlflow`), called on rank 0 only. Their settings come from the driver's environment (`TRACKING_ENV`,
handed to the workers by the driver so that a job's `--env WANDB_API_KEY` reaches them). A resumed run continues the
same W&B run (its id is derived from RUN_DIR); MLflow gets one run per attempt, under the same name.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from core.layout import RunLayout

TRACKING_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_ENTITY", "MLFLOW_TRACKING_URI",
                "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
"""The environment variables the trackers read, forwarded from the driver to the training workers."""


def tracking_env() -> dict[str, str]:
    """The driver's values of TRACKING_ENV (for the workers)."""
    return {name: os.environ[name] for name in TRACKING_ENV if name in os.environ}


class Trackers:
    """Rank 0's loggers: `log(scalars, step)` sends one step to each, `close()` finishes them."""

    def __init__(self, loggers: list[str], layout: RunLayout, project: str, config: dict[str, Any], env: dict[str, str],
                 resume_step: int | None) -> None:
        os.environ.update(env)
        run_name = str(layout.run_dir).rstrip("/").rsplit("/", 1)[-1]
        self.tensorboard = self.wandb = self.mlflow = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(layout.tensorboard_local),
                                             purge_step=resume_step + 1 if resume_step is not None else None)
        if "wandb" in loggers:
            from ray.air.integrations.wandb import setup_wandb

            layout.wandb_local.mkdir(parents=True, exist_ok=True)
            run_id = hashlib.sha256(str(layout.run_dir).encode()).hexdigest()[:16]  # the same run after a resume
            self.wandb = setup_wandb(config=config, project=project, name=run_name, id=run_id, resume="allow",
                                     dir=str(layout.wandb_local), rank_zero_only=False, trial_id=run_id,
                                     trial_name=run_name)
        if "mlflow" in loggers:
            from ray.air.integrations.mlflow import setup_mlflow

            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if uri is None:  # our default: a file store in the run (MLflow 3 wants this said explicitly)
                uri = layout.mlflow_local.resolve().as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.mlflow = setup_mlflow(config=_flat(config), tracking_uri=uri, experiment_name=project,
                                       run_name=run_name, create_experiment_if_not_exists=True, rank_zero_only=False)

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 3e-4}} → {"train.lr": 3e-4}: MLflow params are flat."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
