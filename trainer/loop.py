"""`train_loop_per_worker`: what each Ray Train worker runs — a DeepSpeed engine over the `model/` transformer, fed by
its part of the shards, with validation, metrics and checkpoints that resume exactly (the commit protocol of
`trainer.checkpoints`: versioned folders, a commit record written last, verified before load).

Started by `trainer.driver.train` (`raygpt train CONFIG`); not run by hand.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cluster import storage
from cluster.files import atomic_write, file_records, read_json, remove
from cluster.layout import Location, RunLayout, step_name
from data_pipeline.manifest import read_manifest
from model.checkpoint import save_checkpoint
from model.flops import flops_per_token, mfu, peak_flops
from model.gpt import GPT, ModelConfig
from model.precision import Choice, choose, detect
from trainer import checkpoints
from trainer.config import TrainConfig, deepspeed_config, lr_at
from trainer.data import Position, ShardStream, val_blocks

DS_TAG = "ds"
STATE = "raygpt_state_rank{rank}.json"  # step, data position and RNG of one rank
PHASES = ("data", "forward", "backward", "step")  # the parts of a training step timed into the metrics


def log_rank0(message: str) -> None:
    if ray.train.get_context().get_world_rank() == 0:
        print(message, flush=True)


def param_groups(model: GPT, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms, biases and embeddings (including a tied output projection) get none."""
    embeddings = {id(model.wte.weight)} | ({id(model.wpe.weight)} if model.wpe is not None else set())
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _agree_on_precision(requested: str, device: torch.device) -> Choice:
    """Rank 0 decides from its hardware and every rank takes its choice (mixed precisions cannot all-reduce)."""
    holder: list[Choice | None] = [choose(requested, detect(device)) if dist.get_rank() == 0 else None]  # type: ignore[arg-type]
    dist.broadcast_object_list(holder, src=0)
    assert holder[0] is not None
    return holder[0]


def _rng_state() -> dict[str, str]:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def _set_rng_state(state: dict[str, str]) -> None:
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))


def _consolidated_state(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (ZeRO-3 shards are gathered first; every rank must call this)."""
    import deepspeed

    module = engine.module
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    else:
        state = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    return state if dist.get_rank() == 0 else None


def _evaluate(engine: Any, data_dir: Location, cfg: TrainConfig, tokens_per_byte: float) -> tuple[float, float]:
    """Mean val loss over eval_batches micro-batches per rank (all-reduced) and bits per byte."""
    rank, world = dist.get_rank(), dist.get_world_size()
    engine.eval()
    blocks = list(val_blocks(data_dir, rank, world, cfg.eval_batches * cfg.micro_batch_size))
    total = torch.zeros(2)
    with torch.no_grad():
        for i in range(0, len(blocks), cfg.micro_batch_size):
            batch = torch.from_numpy(np.stack(blocks[i : i + cfg.micro_batch_size]).astype(np.int64))
            _, loss = engine(batch[:, :-1], targets=batch[:, 1:])
            total += torch.tensor([loss.float().item() * len(batch), len(batch)])
    dist.all_reduce(total)
    engine.train()
    val_loss = (total[0] / total[1]).item()
    return val_loss, val_loss / math.log(2) * tokens_per_byte


def _save(engine: Any, tmp: Path, step: int, stream: ShardStream, cfg: dict[str, Any], model_cfg: ModelConfig) -> GPT | None:
    """Every rank: its DeepSpeed shard and its state; rank 0 also the consolidated model (returned on rank 0)."""
    rank = dist.get_rank()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={"step": step})
    state = {"step": step, "position": json.loads(stream.position.to_json()), "rng": _rng_state()}
    atomic_write(tmp / STATE.format(rank=rank), json.dumps(state))
    full = _consolidated_state(engine, cfg["train"]["zero_stage"])
    if full is None:
        return None
    model = GPT(model_cfg)
    model.load_state_dict(full)
    save_checkpoint(model, tmp / RunLayout.MODEL, cfg["layout"].data.tokenizer, extra=_model_meta(step, cfg))
    return model


def _model_meta(step: int, cfg: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "eot_token": cfg["eot_token"]}


def _save_and_commit(
    engine: Any, step: int, stream: ShardStream, cfg: dict[str, Any], model_cfg: ModelConfig, metrics: dict[str, Any]
) -> None:
    """Write this rank's part of the step's checkpoint, report it (Ray uploads it to step-N/), and — once every rank's
    report returned — commit it on rank 0, re-point RUN_DIR/checkpoint at its model and prune old checkpoints."""
    layout: RunLayout = cfg["layout"]
    rank, world = dist.get_rank(), dist.get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        model = _save(engine, Path(tmp), step, stream, cfg, model_cfg)
        files = file_records(tmp)
        ray.train.report(metrics or {"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=step_name(step))
    every: list[dict[str, Any] | None] = [None] * world
    dist.all_gather_object(every, files)  # also the barrier: every rank's report (and upload) has returned
    if rank != 0:
        return
    if step == cfg["faults"].get("kill_before_commit"):
        os.kill(os.getpid(), signal.SIGKILL)  # test-only: rank 0 dies between the checkpoint's files and its commit
    record = checkpoints.commit(layout, step, cfg["fingerprint"], world, checkpoints.merge_files(every))  # type: ignore[arg-type]
    if layout.remote_storage and not layout.remote:  # the published model of a local run is a local folder
        assert model is not None
        save_checkpoint(model, layout.model_dir(step), layout.data.tokenizer, extra=_model_meta(step, cfg), replace=True)
    checkpoints.publish(layout, step, record)
    checkpoints.prune(layout, cfg["keep_checkpoints"])
    _upload_metrics(layout)


def _upload_metrics(layout: RunLayout) -> None:
    """Rank 0, for a run on object storage: the local metrics and TensorBoard mirror replace the run's copy (object
    stores do not append). Called at every checkpoint and at the end."""
    if layout.remote:
        if layout.metrics_local.is_file():
            storage.upload(layout.metrics_local, layout.metrics)
        if layout.tensorboard_local.is_dir():
            storage.upload_folder(layout.tensorboard_local, layout.tensorboard)


def _resume(engine: Any, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Rank 0 picks the newest committed checkpoint (and clears newer uncommitted folders); every rank verifies the
    files against the commit record, then loads its DeepSpeed shard and state. None when there is none."""
    layout: RunLayout = cfg["layout"]
    holder: list[checkpoints.Committed | None] = [None]
    if dist.get_rank() == 0:
        holder[0] = checkpoints.newest(layout)
        stale = [s for s in checkpoints.step_folders(layout) if holder[0] is None or s > holder[0].step]
        checkpoints.remove_steps(layout, stale)  # crashed saves: a new save of that step must start empty
    dist.broadcast_object_list(holder, src=0)
    chosen = holder[0]
    if chosen is None:
        return None
    fs, path = storage.filesystem(chosen.location)
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as folder:
        checkpoints.verify(Path(folder), chosen.record)  # before DeepSpeed unpickles anything
        engine.load_checkpoint(folder, tag=DS_TAG)
        return read_json(Path(folder) / STATE.format(rank=dist.get_rank()), "rank state")


def _continue_metrics(layout: RunLayout, step: int | None) -> None:
    """Rank 0 at the start: for a run on object storage, fetch the run's metrics and TensorBoard into the local
    mirror (this node may not have written them); on resume (`step`), drop metric lines of steps after the resumed
    one (they are about to be run again)."""
    if layout.remote:
        remove(layout.metrics_local)
        remove(layout.tensorboard_local)
        layout.scratch.mkdir(parents=True, exist_ok=True)
        if step is not None and storage.is_file(layout.metrics):
            atomic_write(layout.metrics_local, storage.read_bytes(layout.metrics))
        if step is not None and storage.is_dir(layout.tensorboard):
            storage.download_folder(layout.tensorboard, layout.tensorboard_local)
    if step is not None and layout.metrics_local.is_file():
        kept = [line for line in layout.metrics_local.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(layout.metrics_local, "".join(kept))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    from torch.utils.tensorboard import SummaryWriter

    cfg = TrainConfig.model_validate(config["train"])
    model_cfg = ModelConfig.model_validate(config["model"])
    layout: RunLayout = config["layout"]
    data_dir = layout.data.root
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    manifest = read_manifest(data_dir)
    per_byte = manifest.tokens_per_byte()
    node = ray.get_runtime_context().get_node_id()
    print(f"[train] rank {rank}/{world} on node {node} ({ray.util.get_node_ip_address()})", flush=True)

    precision = _agree_on_precision(cfg.precision, ray.train.torch.get_device())
    log_rank0(f"[train] precision {precision.precision}: {precision.reason}")
    if precision.warning:
        log_rank0(f"[train] warning: {precision.warning}")
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    model = GPT(model_cfg)
    ds_config = deepspeed_config(cfg, config["use_gpu"], precision.precision)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg)),
    )
    step, position = 0, Position()
    state = _resume(engine, config)
    if state is not None:
        step, position = state["step"], Position(**state["position"])
        _set_rng_state(state["rng"])
        log_rank0(f"[train] resumed at step {step} (rank 0 data position {position})")
    else:
        torch.manual_seed(config["seed"] + 1 + rank)  # dropout differs across ranks
    stream = ShardStream(data_dir, "train", rank, world, config["seed"], position)
    batches = stream.batches(cfg.micro_batch_size)

    device = engine.device
    fpt = flops_per_token(model_cfg, manifest.seq_len)
    peak = peak_flops(device, precision.dtype, threads=torch.get_num_threads())  # MFU against the dtype in use
    if rank == 0:
        _continue_metrics(layout, step if state is not None else None)
    # purge_step: TensorBoard drops the events of steps after the resumed one written by an earlier attempt
    writer = SummaryWriter(str(layout.tensorboard_local), purge_step=step + 1 if state else None) if rank == 0 else None
    metrics_file = open(layout.metrics_local, "a") if rank == 0 else None  # appended line by line; rewritten on resume
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world * manifest.seq_len
    fault_step = config["faults"].get("exit_after_step")  # test-only fault hook
    first_step, start = step, time.perf_counter()
    window_start, window_steps, phases = time.perf_counter(), 0, np.zeros(len(PHASES))
    while step < cfg.max_steps:
        for _ in range(cfg.grad_accum_steps):
            t0 = time.perf_counter()
            batch = next(batches).to(device)
            t1 = time.perf_counter()
            _, loss = engine(batch[:, :-1], targets=batch[:, 1:])
            t2 = time.perf_counter()
            engine.backward(loss)  # includes the gradient all-reduce / reduce-scatter at the accumulation boundary
            t3 = time.perf_counter()
            engine.step()  # optimizer on this rank's partition, then the parameter all-gather (ZeRO ≥ 1)
            phases += np.array([t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3])
        step += 1
        window_steps += 1
        if step == fault_step and rank == world - 1 and state is None:
            os._exit(1)  # simulate a worker dying mid-run (only on the first attempt)
        out_of_time = False
        if cfg.time_budget_s is not None:  # every rank must stop at the same step: rank 0's clock decides
            flag = torch.tensor([float(time.perf_counter() - start >= cfg.time_budget_s)])
            dist.broadcast(flag, src=0)
            out_of_time = bool(flag.item())
        last = step == cfg.max_steps or out_of_time
        metrics: dict[str, Any] = {}
        if step % cfg.log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            tps = tokens_per_step * window_steps / elapsed
            achieved = mfu(tps / world, fpt, peak)
            loss_value = loss.detach().float()
            dist.all_reduce(loss_value)
            metrics = {
                "step": step,
                "loss": loss_value.item() / world,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "tokens_per_sec": tps,
                "mfu": achieved,
                "elapsed_s": time.perf_counter() - start,
                "precision": precision.precision,
                # rank 0's profile of the window: where the time of a step goes, as fractions (the rest: logging,
                # reporting, the time-budget broadcast)
                **{f"time_{name}": float(t / elapsed) for name, t in zip(PHASES, phases)},
            }
            window_start, window_steps, phases = time.perf_counter(), 0, np.zeros(len(PHASES))
        if step % cfg.eval_every == 0 or last:
            metrics["val_loss"], metrics["val_bpb"] = _evaluate(engine, data_dir, cfg, per_byte)
        if metrics:
            metrics.setdefault("step", step)
            if rank == 0:
                eta = (cfg.max_steps - step) * (time.perf_counter() - start) / max(step - first_step, 1)
                shown = " ".join(
                    f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and not k.startswith("time_")
                )
                print(f"[train] step {step}/{cfg.max_steps} {shown} eta {eta:.0f}s", flush=True)
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                for key, value in metrics.items():
                    if isinstance(value, float):
                        writer.add_scalar(key, value, step)
                writer.flush()
        if step % cfg.checkpoint_every == 0 or last:
            _save_and_commit(engine, step, stream, config, model_cfg, metrics)
        elif metrics:
            ray.train.report(metrics)
        if out_of_time:
            break
    if writer is not None:
        writer.close()
        metrics_file.close()
        _upload_metrics(layout)
