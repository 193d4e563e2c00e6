"""`raygpt train CONFIG`: the Ray Train driver — checks everything it can before any worker starts, then runs
`train_loop_per_worker` on N DeepSpeed workers with `TorchTrainer`.

    raygpt train configs/demo.yaml train.max_steps=50 cluster.num_workers=2

Checkpoints go to Ray Train storage (`cluster.storage_path`, default RUN_DIR; a URI works) as
`checkpoints/step-N/`, committed by `trainer.checkpoints`. Re-running the same command resumes from the newest
committed checkpoint, after checking that it belongs to the same run (fingerprint) and is intact (commit record).
Worker failures are retried `cluster.max_failures` times, each time from the newest committed checkpoint. With
`cluster.num_workers: [min, max]` the group is elastic: it starts with what the cluster has, grows when nodes are
added and shrinks when one is lost; every resize resumes from the newest committed checkpoint, and the global batches
are the same at every size (`trainer.data`, `trainer.state`).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from core import files
from core.config import ClusterConfig
from core.errors import RunFileError, UserError
from core.layout import Location, RunLayout, is_uri, join
from data_pipeline.config import DataError
from data_pipeline.manifest import Manifest, read_manifest
from model.checkpoint import published_step, weights_stamp
from model.config import ModelSection
from model.gpt import ModelConfig
from trainer import checkpoints, liveness, preemption
from trainer.config import TrainConfig
from trainer.data import even_world_sizes
from trainer.loop import WorkerConfig, train_loop_per_worker
from trainer.mixture import Phases, Sources, moved_boundaries
from trainer.tracking import tracking_env


class Interrupted(UserError):
    """The run stopped before max_steps at a committed step (SIGTERM to the driver); the same command resumes it."""


def check_data(data_dir: Location, verify_hashes: bool = True) -> Manifest:
    """The manifest, after checking that every shard exists and is intact: size and sha256 for local data; on object
    storage size only — hashing there would download the corpus to the driver; the workers check each shard's sha256
    as they stream it."""
    manifest = read_manifest(data_dir)
    manifest.verify(data_dir, verify_hashes and not files.is_uri(data_dir))
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
    fingerprint; a data.mixture phase may end later if both ends lie ahead of the step reached) and, in local storage,
    that its files match the commit record. Refused with one line otherwise."""
    if not layout.remote and Path(layout.checkpoint).exists() and not Path(layout.checkpoint).is_symlink():
        raise RunFileError(f"{layout.checkpoint} is a folder, not the link raygpt publishes (an older raygpt wrote it); "
                           "move it away or use a new run_dir")
    newest = checkpoints.newest(layout)
    if newest is None:
        return None
    recorded = dict(newest.record["fingerprint"])
    if moved_boundaries(recorded.get("data.mixture"), run_fp.get("data.mixture"), newest.step):
        print(f"[train] data.mixture: a phase now ends elsewhere, after step {newest.step}: the same run goes on",
              flush=True)
        recorded["data.mixture"] = run_fp["data.mixture"]
    if diffs := checkpoints.differences(recorded, run_fp):
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise RunFileError(
            f"{layout.run_dir} holds checkpoints of another training run ({shown}); use a new run_dir, or "
            "train.resume=false to start over (the old checkpoints are moved aside, not deleted)"
        )
    checkpoints.verify_listing(newest.location, newest.record)  # the workers hash what they read
    return newest


def injected_faults() -> dict[str, int]:
    """Fault injection for tests only, from the environment of the process that runs the driver (RAYGPT_TEST_FAULTS,
    JSON, e.g. {"exit_after_step": 7}, {"kill_in_upload": 8}, {"step_ms": 100}; see `trainer.faults`); empty in
    production."""
    raw = os.environ.get("RAYGPT_TEST_FAULTS")
    faults = {str(k): int(v) for k, v in json.loads(raw).items()} if raw else {}
    return faults | {"token": uuid.uuid4().int >> 80} if faults else {}


def scaling_config(cluster: ClusterConfig) -> ScalingConfig:
    """Ray Train's ScalingConfig: a fixed group, or an elastic (min, max) one checked for a resize every
    `cluster.elastic_resize_s`."""
    low, high = cluster.worker_range
    return ScalingConfig(
        num_workers=(low, high) if low != high else low,
        use_gpu=cluster.use_gpu,
        resources_per_worker={"CPU": cluster.cpus_per_worker, **({"GPU": 1} if cluster.use_gpu else {})},
        placement_strategy=cluster.placement_strategy,
        **({"elastic_resize_monitor_interval_s": cluster.elastic_resize_s} if low != high else {}),
    )


def _fit(worker: WorkerConfig, cluster: ClusterConfig) -> Any:
    """One launch of the worker group, until it finishes, fails past cluster.max_failures, or stops for a preemption
    notice (its rank 0 then returns why: `Result.return_value`)."""
    layout = worker.layout
    checkpoints.forget_ray_state(layout)
    # read by Ray Train's controller (propagated from this process): how long a group may take to be placed
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cluster.worker_start_timeout_s)
    # Ray Train's own files (its run state) go to the same storage as the checkpoints
    fs, storage_path = files.filesystem(layout.storage) if layout.remote_storage else (None, layout.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": worker},
        scaling_config=scaling_config(cluster),
        run_config=RunConfig(
            name=RunLayout.CHECKPOINTS,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # trainer.checkpoints prunes committed ones
            failure_config=FailureConfig(max_failures=cluster.max_failures),
        ),
    )
    return trainer.fit()


def train(worker: WorkerConfig, cluster: ClusterConfig) -> Any:
    """Run (or resume) training on a fixed or elastic worker group; returns Ray Train's Result. Every (re)start of the
    group — a failure, or an elastic resize — resumes from the newest committed checkpoint at the new world size. A
    preemption notice (SIGTERM to a worker, a node drain) makes the group checkpoint at its step and stop; the group
    is then launched again from there (a draining node takes no new workers). SIGTERM to this process stops the run
    the same way and ends it with one line."""
    layout = worker.layout
    if not layout.remote:
        Path(layout.run_dir).mkdir(parents=True, exist_ok=True)
        layout = RunLayout(Path(layout.run_dir).resolve(), layout.storage)
    name = f"raygpt-stop-{uuid.uuid4().hex[:12]}"
    stop = preemption.stop_requests(name)
    worker = replace(worker, layout=layout, faults=injected_faults(), stop_actor=name)
    low, high = cluster.worker_range
    even = even_world_sizes(worker.global_batch_size, worker.train.micro_batch_size, max(high, 8))
    print(f"[train] global batch {worker.global_batch_size} at every world size; workers {low}"
          + (f"–{high} (elastic)" if high > low else "") + f"; world sizes that fill every micro-batch: "
          f"{', '.join(map(str, even))} (others pad a few)", flush=True)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = preemption.driver_handler(stop) if main_thread else None
    try:
        reached: int | None = None
        while True:
            result = _fit(worker, cluster)
            stopped = result.return_value if isinstance(result.return_value, dict) else None
            if not stopped:
                return result
            step = stopped["step"]
            if stopped["stopped"] == preemption.REASONS[3]:
                raise Interrupted(f"stopped by SIGTERM at step {step} (committed); the same command resumes there")
            if step == reached:  # stopped twice at one step: no progress is being made
                raise Interrupted(f"stopped twice at step {step}: {stopped['stopped']}")
            reached = step
            print(f"[train] stopped at step {step} ({stopped['stopped']}): starting the worker group again from there",
                  flush=True)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        ray.kill(stop)


def added_tokens(init_from: str, layout: RunLayout, manifest: Manifest, base_vocab: int) -> dict[int, str]:
    """id → token of the tokens the prepared data's tokenizer adds to the base checkpoint's (its chat tokens:
    `model.vocab`), which the workers give rows at the mean embedding; data of another tokenizer is one line."""
    from tokenizers import Tokenizer

    from model.vocab import added_ids

    base = Tokenizer.from_str(files.read_text(join(init_from, "tokenizer.json")))
    try:
        added = added_ids(base, Tokenizer.from_str(files.read_text(layout.data.tokenizer)))
    except ValueError:
        added = {}
    if not added or base_vocab + len(added) != manifest.vocab_size:
        raise DataError(f"model.init_from {init_from} has {base_vocab} tokens, the prepared data "
                        f"{manifest.vocab_size}: prepare it with that tokenizer (data.tokenizer.path: "
                        f"{init_from}/tokenizer.json)")
    print(f"[train] extending {init_from}'s vocabulary of {base_vocab} with {', '.join(added.values())} (ids "
          f"{min(added)}-{max(added)}; their rows start at the mean embedding)", flush=True)
    return added


def absolute(location: str | None) -> str | None:
    """A local path made absolute (workers do not share the driver's working directory); URIs as they are."""
    return location if location is None or is_uri(location) else str(Path(location).resolve())


def kept_global_batch(layout: RunLayout, resolved: int) -> int:
    """With train.global_batch_size unset, a resume keeps the global batch its run recorded (micro × the largest
    group of the run that wrote it) rather than refusing a run that only changed cluster.num_workers; said in one
    line. An explicit value is compared with the record like every other setting."""
    newest = checkpoints.newest(layout)
    recorded = newest.record.get("fingerprint", {}).get("train.global_batch_size") if newest is not None else None
    if not isinstance(recorded, int) or recorded == resolved:
        return resolved
    print(f"[train] train.global_batch_size is unset: keeping this run's global batch of {recorded} (micro-batch × "
          f"workers would now give {resolved}); set it explicitly to start another run", flush=True)
    return recorded


def train_stage(train_cfg: TrainConfig, model: ModelSection, cluster: ClusterConfig, layout: RunLayout, seed: int,
                global_batch_size: int, begin: Callable[[], Any], mixture: Phases | None = None) -> Any:
    """The train stage (`raygpt train`): shards → committed checkpoints, resuming from the newest committed one of the
    same run; skipped when this run already finished. Everything checkable — data, model, the run fingerprint against
    existing checkpoints — fails before any worker starts or file is written; then `begin` connects to Ray and
    records the run's config. Returns Ray Train's Result (None when skipped)."""
    manifest = check_data(layout.data.root)
    model_cfg = model.resolve(vocab_size=manifest.vocab_size, block_size=manifest.seq_len)
    added: dict[int, str] = {}
    if model.init_from is not None and model_cfg.vocab_size != manifest.vocab_size:
        added = added_tokens(model.init_from, layout, manifest, model_cfg.vocab_size)
        model_cfg = model_cfg.model_copy(update={"vocab_size": manifest.vocab_size})  # the base's rows + the new ones
    check_model(manifest, model_cfg)
    if train_cfg.global_batch_size is None and train_cfg.resume:
        global_batch_size = kept_global_batch(layout, global_batch_size)
    Sources(manifest, mixture, seed)  # a mixture of sources the data lacks, or without blocks: one line, now
    run_fp = checkpoints.run_fingerprint(train_cfg, model_cfg, manifest, seed, global_batch_size)
    if mixture is not None:
        run_fp["data.mixture"] = [[until, weights] for until, weights in mixture]
    if model.init_from is not None:
        run_fp["model.init_from"] = files.fingerprint(weights_stamp(model.init_from))  # other base weights: another run
    if added:  # the base's vocabulary extended (new rows start at the mean embedding): recorded, so a change is refused
        run_fp["model.init_from.added_tokens"] = {str(i): token for i, token in added.items()}
    done_key = files.fingerprint({"run": run_fp, "max_steps": train_cfg.max_steps, "time_budget_s": train_cfg.time_budget_s})
    if train_cfg.resume:
        if files.completed(layout.train_done, done_key) and published_step(layout.checkpoint) is not None:
            print(f"[train] {layout.checkpoint} is complete for this config; skipping", flush=True)
            return None
        resumed = check_resume(layout, run_fp)
        if resumed is not None:
            print(f"[train] resuming from committed checkpoint {resumed.location}", flush=True)
    else:
        for moved in checkpoints.start_over(layout):
            print(f"[train] train.resume=false: moved {moved.name} aside", flush=True)
    begin()
    worker = WorkerConfig(train=train_cfg, model=model_cfg, layout=layout, seed=seed, global_batch_size=global_batch_size,
                          use_gpu=cluster.use_gpu, eot_token=manifest.eot_token, fingerprint=run_fp,
                          init_from=absolute(model.init_from), tracking_env=tracking_env(), driver=liveness.identity(),
                          mixture=mixture)
    result = train(worker, cluster)
    step = published_step(layout.checkpoint)
    files.write_json(layout.train_done, {"fingerprint": done_key, "step": step})
    print(f"[train] done: step {step}, checkpoint {layout.checkpoint}, metrics {layout.metrics}", flush=True)
    return result
