"""Where every file of a run lives: `RunLayout` is computed once from the config and is the only place a path under a
run directory is built (a test greps the code base for any other).

    python -m core.layout runs/demo        # prints the layout of a run directory

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
      quantized/gguf/model-<type>.gguf                 raygpt quantize (evaluation/quantize_gguf.py)
      sample.txt                the sample stage of raygpt run (model/sample.py)

RUN_DIR may be a local folder or an object-storage URI (s3://bucket/run, gs://bucket/run; `core.files` reads
and writes it). Then every location above is a URI string instead of a `Path`; `checkpoint` is a small JSON object
(step, model location, file hashes) instead of a symlink; and what must be a local folder while a stage runs (rank 0's
metrics and TensorBoard before upload, lm-eval's task files) lives in `scratch`, a folder under the local cache.

Standard library only, like `core.files`: every package may import it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val")

Location = Path | str
"""A local path, or an object-storage URI string (s3://bucket/key, gs://bucket/key)."""


def is_uri(loc: Location | None) -> bool:
    return loc is not None and "://" in str(loc)


def join(loc: Location, *parts: str) -> Location:
    """`loc / parts` for a path or a URI."""
    if is_uri(loc):
        return "/".join([str(loc).rstrip("/"), *parts])
    return Path(loc).joinpath(*parts)


def cache_dir() -> Path:
    """The local cache (downloaded checkpoints, rank 0's metrics mirror of a run on object storage): RAYGPT_CACHE,
    default ~/.cache/raygpt."""
    return Path(os.environ.get("RAYGPT_CACHE") or Path.home() / ".cache" / "raygpt")


def cached_checkpoints() -> Path:
    """The folder of the local copies of checkpoints downloaded from object storage (bounded by `core.cache`)."""
    return cache_dir() / "checkpoints"


def cached_checkpoint(key: str) -> Path:
    """The local copy of a checkpoint downloaded from object storage, named by its files' hashes."""
    return cached_checkpoints() / key


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

    root: Location
    MANIFEST = "manifest.json"
    TOKENIZER = "tokenizer.json"

    @property
    def manifest(self) -> Location:
        return join(self.root, self.MANIFEST)

    @property
    def tokenizer(self) -> Location:
        return join(self.root, self.TOKENIZER)

    def split_dir(self, split: str) -> Location:
        return join(self.root, split)

    @staticmethod
    def shard_name(split: str, unit: int, part: int) -> str:
        """A shard's path relative to the data folder, as the manifest lists it: the `part`-th tar of a unit's split."""
        return f"{split}/shard-{unit:06d}-{part:04d}.tar"


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run. `storage` is where training checkpoints go (Ray Train storage): RUN_DIR, or
    `cluster.storage_path` (a local path or a URI)."""

    run_dir: Location
    storage: str

    @classmethod
    def of(cls, run_dir: Location, storage_path: str | None = None) -> RunLayout:
        if is_uri(run_dir):
            run_dir = str(run_dir).rstrip("/")
            return cls(run_dir, storage_path or run_dir)
        run_dir = Path(run_dir)
        return cls(run_dir, storage_path or str(run_dir.resolve()))

    @property
    def remote(self) -> bool:
        """RUN_DIR is on object storage."""
        return is_uri(self.run_dir)

    def _at(self, *parts: str) -> Location:
        return join(self.run_dir, *parts)

    @property
    def scratch(self) -> Path:
        """Local work folder of this run: RUN_DIR itself, or for a run on object storage a folder in the local cache
        named by the run's URI (rank 0's metrics and TensorBoard before upload, lm-eval task files)."""
        if not self.remote:
            return Path(self.run_dir)
        return cache_dir() / "runs" / hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:16]

    @property
    def data(self) -> DataLayout:
        return DataLayout(self._at("data"))

    @property
    def console_log(self) -> Path:
        """Everything a stage command printed, Ray's and DeepSpeed's internals included (cluster/console.py): a
        local file."""
        return self.scratch / "logs" / "console.log"

    @property
    def lock(self) -> Location:
        """A file held with flock, or on object storage a lease object (cluster/run_lock.py)."""
        return self._at(".lock")

    @property
    def config(self) -> Location:
        return self._at("config.yaml")

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

    def model_dir(self, step: int) -> Location:
        """Where the consolidated model of a step is published from: inside its training checkpoint, except when the
        checkpoints are on object storage and RUN_DIR is local: then a local copy under RUN_DIR/models."""
        if self.remote_storage and not self.remote:
            return join(self.run_dir, "models", step_name(step))
        return join(self.checkpoint_dir(step), self.MODEL)

    @property
    def models(self) -> Location:
        return self._at("models")

    @property
    def checkpoint(self) -> Location:
        """The newest committed consolidated checkpoint (what eval, quantize, sample, generate and export take): a
        symlink, or on object storage a JSON pointer object (step, model location, file hashes)."""
        return self._at("checkpoint")

    @property
    def train_done(self) -> Location:
        return self._at("train.done.json")

    @property
    def extended_tokenizer(self) -> Location:
        """A fine-tuning run whose base tokenizer lacks the chat tokens: that tokenizer with them added, which its
        data is prepared with (`cluster.pipeline.run_finetune`, `model.vocab`)."""
        return self._at("tokenizer.chat.json")

    @property
    def metrics(self) -> Location:
        return self._at("metrics.jsonl")

    @property
    def tensorboard(self) -> Location:
        return self._at("tb")

    @property
    def metrics_local(self) -> Path:
        """Where rank 0 appends metrics: `metrics` itself, or its local mirror (uploaded at checkpoints and the end)."""
        return self.scratch / "metrics.jsonl"

    @property
    def tensorboard_local(self) -> Path:
        return self.scratch / "tb"

    @property
    def wandb_local(self) -> Path:
        """Where W&B keeps its run files (offline runs too): a local folder (trainer/tracking.py)."""
        return self.scratch / "wandb"

    @property
    def mlflow_local(self) -> Path:
        """The MLflow file store used when MLFLOW_TRACKING_URI is not set: a local folder (trainer/tracking.py)."""
        return self.scratch / "mlruns"

    # ------------------------------------------------------------------ evaluation, quantization, sample
    @property
    def eval_dir(self) -> Location:
        return self._at("eval")

    @property
    def eval_work(self) -> Path:
        """lm-eval's local task files of the eval stage (a local folder)."""
        return self.scratch / "eval"

    @property
    def eval_results(self) -> Location:
        return join(self.eval_dir, "results.json")

    @property
    def eval_report(self) -> Location:
        return join(self.eval_dir, "report.md")

    @property
    def quantized_dir(self) -> Location:
        return self._at("quantized")

    def quantized(self, method: str) -> Location:
        return join(self.quantized_dir, method)

    def quantized_hf(self, method: str) -> Location:
        """A bitsandbytes checkpoint exported in transformers' format."""
        return join(self.quantized(method), "hf")

    def quantized_local(self, method: str) -> Path:
        """Where a quantized checkpoint is built: `quantized(method)`, or for a run on object storage a local folder
        in `scratch` that is uploaded there once complete."""
        return self.scratch / "quantized" / method

    def quantized_hf_local(self, method: str) -> Path:
        return self.quantized_local(method) / "hf"

    def quantized_gguf(self, quant: str) -> Location:
        """The checkpoint exported for llama.cpp with one GGUF type (evaluation/quantize_gguf.py)."""
        return join(self.quantized_dir, "gguf", f"model-{quant}.gguf")

    def quantized_gguf_local(self, quant: str) -> Path:
        """Where that file is written: `quantized_gguf(quant)`, or for a run on object storage under `scratch`."""
        return self.scratch / "quantized" / "gguf" / f"model-{quant}.gguf"

    def method_report(self, method: str) -> Location:
        """The row of one quantized checkpoint, beside its weights."""
        return join(self.quantized(method), "report.json")

    @property
    def quantize_work(self) -> Path:
        """lm-eval's local task files of the evaluations the quantize stage runs (a local folder)."""
        return self.scratch / "quantized" / "eval-work"

    @property
    def quantize_report(self) -> Location:
        return join(self.quantized_dir, "report.json")

    @property
    def quantize_report_md(self) -> Location:
        return join(self.quantized_dir, "report.md")

    # ------------------------------------------------------------------ report card
    @property
    def report(self) -> Location:
        """The run's report card (cluster/report.py)."""
        return self._at("report.md")

    def report_plot(self, name: str) -> Location:
        """A plot of the report card: RUN_DIR/report/<name>.png."""
        return self._at("report", name)

    @property
    def sample(self) -> Location:
        return self._at("sample.txt")


if __name__ == "__main__":
    layout = RunLayout.of(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    for name in ("lock", "config", "checkpoints", "checkpoint", "train_done", "metrics", "tensorboard", "eval_results",
                 "eval_report", "quantize_report", "sample"):
        print(f"{name:16} {getattr(layout, name)}")
    print(f"{'manifest':16} {layout.data.manifest}")
