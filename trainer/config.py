"""The `train` section of the run config and the DeepSpeed config generated from it (in one place).

Used by `raygpt train CONFIG`; `deepspeed_config` is the only place a DeepSpeed dict is built.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from core.config import Section


class TrainConfig(Section):
    """Optimization, precision, parallelism, evaluation and checkpoint cadence."""

    max_steps: int = Field(default=1000, ge=1)
    """Optimizer steps to train for (each sees global_batch_size sequences)."""
    micro_batch_size: int = Field(default=8, ge=1)
    """Sequences per worker per forward/backward pass."""
    global_batch_size: int | None = Field(default=None, ge=1)
    """Sequences per optimizer step, the same at every world size W: each worker accumulates
    ⌈⌈global_batch_size / W⌉ / micro_batch_size⌉ micro-batches (when W × micro_batch_size does not divide it, a few
    are short or empty and weighted so the gradient is still the mean over the global batch). None means
    micro_batch_size × the largest cluster.num_workers; set it explicitly for an elastic run."""
    lr: float = Field(default=6e-4, gt=0)
    """Peak learning rate (after warmup)."""
    min_lr: float = Field(default=6e-5, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(default=100, ge=0)
    """Linear warmup from 0 to lr over these steps, then cosine decay to min_lr at max_steps."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW weight decay of matrices; norms, biases and embeddings get none."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this (0 disables)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto (bf16 where the hardware runs it natively — bf16 GPUs, CPUs with AVX512_BF16/AMX —, fp16 on older GPUs,
    else fp32; see `model.precision`), or bf16, fp16 (dynamic loss scaling; GPU only), fp32."""
    compile: bool = False
    """torch.compile the model (DeepSpeed's `engine.compile()`, inductor): faster steps after a one-off compile of
    tens of seconds to minutes; see the README for what it measured."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """DeepSpeed ZeRO stage: 0 data parallel, 1 optimizer states, 2 + gradients, 3 + parameters sharded."""
    offload_optimizer: bool = False
    """ZeRO 2/3: keep optimizer states on CPU."""
    offload_params: bool = False
    """ZeRO 3: keep parameters on CPU."""
    eval_every: int = Field(default=100, ge=1)
    """Steps between validations (val loss and bits per byte); also at the last step."""
    eval_batches: int = Field(default=10, ge=1)
    """Size of the fixed validation set, in micro-batches: the first eval_batches × micro_batch_size val blocks, split
    over the workers (the same set at every world size)."""
    checkpoint_every: int = Field(default=200, ge=1)
    """Steps between checkpoints; one is always written at the last step."""
    checkpoint_every_s: float | None = Field(default=None, gt=0)
    """Also checkpoint once this many seconds passed since the last one (rank 0's clock): bounds the work a lost node
    or a resize of an elastic group costs. None: by steps only."""
    checkpoint_async: bool = True
    """Write and upload checkpoints in a background thread: training waits only for each rank's copy of its share
    into host memory (`trainer.checkpointer`); at most one checkpoint is in flight. False writes them before the next
    step (the contrast in benchmarks/checkpoint_stall.py)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Committed training checkpoints kept (the newest); older ones are deleted once a newer one is committed."""
    resume: bool = True
    """Continue from the newest committed checkpoint of this run_dir. False starts over: existing checkpoints are moved
    aside (checkpoints.old-N), never deleted. A run_dir whose checkpoints come from another training config is refused
    either way unless resume is false."""
    log_every: int = Field(default=10, ge=1)
    """Steps between metric lines (metrics.jsonl, the loggers, the progress line)."""
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]
    """Where rank 0 sends the training scalars besides metrics.jsonl: TensorBoard (RUN_DIR/tb), Weights & Biases
    (Ray's `setup_wandb`: WANDB_API_KEY, or WANDB_MODE=offline, from the driver's environment; files in
    RUN_DIR/wandb) and MLflow (Ray's `setup_mlflow`: MLFLOW_TRACKING_URI, else a file store in RUN_DIR/mlruns).
    W&B and MLflow need their packages: pip install 'raygpt[tracking]'."""
    tracking_project: str = "raygpt"
    """The W&B project and the MLflow experiment the run is logged under (the run is named after RUN_DIR)."""
    time_budget_s: float | None = Field(default=None, gt=0)
    """Stop (with a checkpoint) once training has run this long; None trains for max_steps."""
    deepspeed: dict[str, Any] = {}
    """Escape hatch: merged (recursively) over the generated DeepSpeed config."""

    def resolved_global_batch(self, max_workers: int) -> int:
        """Sequences per optimizer step: `global_batch_size`, or micro_batch_size × the largest worker group. The one
        place it is resolved; the run config, the plan and the workers all take it from here as `global_batch_size`."""
        return self.global_batch_size or self.micro_batch_size * max_workers


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: TrainConfig, use_gpu: bool, precision: Literal["fp32", "bf16", "fp16"], accum: int) -> dict[str, Any]:
    """The DeepSpeed config: batch, precision (`cfg.precision` resolved for the hardware), ZeRO, optimizer, clipping.
    Only micro-batch and accumulation (`accum`, derived from the global batch and the world size) are set, never
    train_batch_size (DeepSpeed derives it from the world size)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    adam: dict[str, Any] = {"lr": cfg.lr, "betas": list(cfg.betas), "eps": 1e-8, "weight_decay": cfg.weight_decay}
    if not use_gpu:
        adam["torch_adam"] = True  # FusedAdam needs CUDA; DeepSpeed picks it on GPU
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adam},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, cfg.deepspeed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at a step: linear warmup, then cosine decay to min_lr/lr at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
