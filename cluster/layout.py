"""Where every file of a run lives: `RunLayout` is computed once from the config and is the only place a path under a
run directory is built (a test greps the code base for any other).

    python -m cluster.layout runs/demo        # prints the layout of a run directory

    RUN_DIR/
      .lock                     run_lock: the process writing this run (cluster/run_lock.py)
      config.yaml               the resolved config of the last command that wrote the run (cluster/config.py)
      data/                     raygpt prepare (data_pipeline/prepare.py)
        manifest.json             written last: the data is complete when it exists (data_pipeline/manifest.py)
        tokenizer.json
        train/shard-000000.tar, val/shard-000000.tar
      checkpoints/              raygpt train, Ray Train storage (trainer/checkpoints.py); or under cluster.storage_path
        step-000120/              one training checkpoint: DeepSpeed shards, per-rank state, model/ (consolidated)
          commit.json             written last, after every rank reported: step, fingerprint, world size, file hashes
      checkpoint -> checkpoints/step-000120/model   the newest committed consolidated model (a symlink, swapped)
      models/step-000120/       consolidated models, when training checkpoints live on object storage
      train.done.json           training finished for this fingerprint and max_steps
      metrics.jsonl, tb/        rank 0 of training (trainer/loop.py)
      eval/results.json, eval/report.md                 raygpt eval (evaluation/run.py)
      quantized/<method>/, quantized/report.{json,md}   raygpt quantize (evaluation/quantize.py)
      sample.txt                raygpt sample (cluster/pipeline.py)

Standard library only, like `cluster.files`: every package may import it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val")


def step_name(step: int) -> str:
    """The folder name of a training checkpoint: step-000120 (sorts by step)."""
    return f"step-{step:06d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name, or None when it is not one."""
    prefix, _, digits = name.partition("-")
    return int(digits) if prefix == "step" and digits.isdigit() and len(digits) >= 6 else None


@dataclass(frozen=True)
class DataLayout:
    """The prepared data folder (RUN_DIR/data, or any copy of it)."""

    root: Path
    MANIFEST = "manifest.json"
    TOKENIZER = "tokenizer.json"

    @property
    def manifest(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def tokenizer(self) -> Path:
        return self.root / self.TOKENIZER

    def split_dir(self, split: str) -> Path:
        return self.root / split

    @staticmethod
    def shard_name(split: str, shard: int) -> str:
        """A shard's path relative to the data folder, as the manifest lists it."""
        return f"{split}/shard-{shard:06d}.tar"

    def shard(self, split: str, shard: int) -> Path:
        return self.root / self.shard_name(split, shard)


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run. `storage` is where training checkpoints go (Ray Train storage): RUN_DIR, or
    `cluster.storage_path` (a local path or a URI)."""

    run_dir: Path
    storage: str

    @classmethod
    def of(cls, run_dir: str | Path, storage_path: str | None = None) -> RunLayout:
        run_dir = Path(run_dir)
        return cls(run_dir, storage_path or str(run_dir.resolve()))

    @property
    def data(self) -> DataLayout:
        return DataLayout(self.run_dir / "data")

    @property
    def lock(self) -> Path:
        return self.run_dir / ".lock"

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    # ------------------------------------------------------------------ training
    CHECKPOINTS = "checkpoints"
    """Ray Train's run name: the checkpoints folder under `storage`."""
    COMMIT = "commit.json"
    """The commit record inside a training checkpoint, written last."""
    MODEL = "model"
    """The consolidated model folder inside a training checkpoint."""

    @property
    def remote_storage(self) -> bool:
        return "://" in self.storage

    @property
    def checkpoints(self) -> str:
        """Folder (or URI) of the versioned training checkpoints."""
        return f"{self.storage.rstrip('/')}/{self.CHECKPOINTS}"

    def checkpoint_dir(self, step: int) -> str:
        return f"{self.checkpoints}/{step_name(step)}"

    def model_dir(self, step: int) -> Path:
        """Where the consolidated model of a step is published from: inside its training checkpoint when that is a
        local folder, else a local copy under RUN_DIR/models."""
        if self.remote_storage:
            return self.run_dir / "models" / step_name(step)
        return Path(self.checkpoint_dir(step)) / self.MODEL

    @property
    def models(self) -> Path:
        return self.run_dir / "models"

    @property
    def checkpoint(self) -> Path:
        """The newest committed consolidated checkpoint (what eval, quantize, sample, generate and export take)."""
        return self.run_dir / "checkpoint"

    @property
    def train_done(self) -> Path:
        return self.run_dir / "train.done.json"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.run_dir / "tb"

    # ------------------------------------------------------------------ evaluation, quantization, sample
    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"

    @property
    def eval_results(self) -> Path:
        return self.eval_dir / "results.json"

    @property
    def eval_report(self) -> Path:
        return self.eval_dir / "report.md"

    @property
    def quantized_dir(self) -> Path:
        return self.run_dir / "quantized"

    def quantized(self, method: str) -> Path:
        return self.quantized_dir / method

    def quantized_hf(self, method: str) -> Path:
        """A bitsandbytes checkpoint exported in transformers' format."""
        return self.quantized(method) / "hf"

    def method_report(self, method: str) -> Path:
        """The row of one quantized checkpoint, beside its weights."""
        return self.quantized(method) / "report.json"

    @property
    def quantize_work(self) -> Path:
        """lm-eval's local task files of the evaluations the quantize stage runs."""
        return self.quantized_dir / "eval-work"

    @property
    def quantize_report(self) -> Path:
        return self.quantized_dir / "report.json"

    @property
    def quantize_report_md(self) -> Path:
        return self.quantized_dir / "report.md"

    @property
    def sample(self) -> Path:
        return self.run_dir / "sample.txt"


if __name__ == "__main__":
    layout = RunLayout.of(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    for name in ("lock", "config", "checkpoints", "checkpoint", "train_done", "metrics", "tensorboard", "eval_results",
                 "eval_report", "quantize_report", "sample"):
        print(f"{name:16} {getattr(layout, name)}")
    print(f"{'manifest':16} {layout.data.manifest}")
