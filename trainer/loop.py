"""`train_loop_per_worker`: what each Ray Train worker runs — a DeepSpeed engine over the `model/` transformer, fed
its slice of every global batch, with validation, metrics and checkpoints that resume exactly at any world size (the
checkpoint component `trainer.checkpointer`; the data order of `trainer.data`) and stop at the step reached when a
preemption notice arrives (`trainer.preemption`).

Started by `trainer.driver.train` (`raygpt train CONFIG`); not run by hand. The worker is one `Worker` whose parts
are small and separate: `setup` (engine, data), `resume`, `train_step`, `evaluate`, `log`, and `run`, the loop that
calls them and `Checkpointer.save`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from core import files
from core.layout import RunLayout
from core.progress import progress_line
from data_pipeline.manifest import Manifest, read_manifest
from model.checkpoint import load_checkpoint
from model.flops import checked_mfu, flops_per_token, peak_flops
from model.gpt import GPT, ModelConfig
from model.precision import Choice, choose, detect
from model.vocab import grow_embeddings
from trainer import faults, liveness, preemption
from trainer.checkpointer import Checkpointer
from trainer.config import TrainConfig, deepspeed_config, lr_at
from trainer.deepspeed_import import import_deepspeed
from trainer.data import SampleReader, StepData, grad_accum, rank_steps, val_ids
from trainer.metrics import batch_digest, continue_metrics, memory, sample_digests, upload_metrics
from trainer.mixture import Phases, Sources
from trainer.tracking import Trackers

PHASES = ("data", "forward", "backward", "step")  # the parts of a training step timed into the metrics


@dataclass(frozen=True)
class WorkerConfig:
    """What the driver hands every worker (typed; the same object at every world size)."""

    train: TrainConfig
    model: ModelConfig
    layout: RunLayout
    seed: int
    global_batch_size: int
    """Sequences per optimizer step at every world size (`TrainConfig.resolved_global_batch`)."""
    use_gpu: bool
    eot_token: str
    fingerprint: dict[str, Any]
    init_from: str | None = None
    """A raygpt checkpoint whose weights replace the random init (model.init_from); a resume overwrites them."""
    tracking_env: dict[str, str] = field(default_factory=dict)
    """The driver's W&B / MLflow settings (trainer.tracking.TRACKING_ENV), for rank 0's trackers."""
    mixture: Phases | None = None
    """`data.phases()`: (last step, weights by source) phases; None draws every block alike (`trainer.mixture`)."""
    driver: dict[str, str | int] | None = None
    """The driver process (`trainer.liveness.identity`): workers on its machine stop when it is gone."""
    faults: dict[str, int] = field(default_factory=dict)
    """Tests only (set by the driver from RAYGPT_TEST_FAULTS): the faults `trainer.faults.InjectedFaults` injects."""
    stop_actor: str | None = None
    """The name of the driver's `trainer.preemption.StopRequests` actor (its SIGTERM reaches the workers there)."""


def log_rank0(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def param_groups(model: GPT, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms, biases and embeddings (including a tied output projection) get none."""
    embeddings = {id(model.wte.weight)} | ({id(model.wpe.weight)} if model.wpe is not None else set())
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def step_seed(seed: int, step: int, rank: int) -> int:
    """The dropout RNG of a rank at a step: a pure function, so no RNG state needs saving and a resume is exact."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest(), "little") >> 1


def _agree_on_precision(requested: str, device: torch.device) -> Choice:
    """Rank 0 decides from its hardware and every rank takes its choice (mixed precisions cannot all-reduce)."""
    holder: list[Choice | None] = [choose(requested, detect(device)) if dist.get_rank() == 0 else None]  # type: ignore[arg-type]
    dist.broadcast_object_list(holder, src=0)
    assert holder[0] is not None
    return holder[0]


class Worker:
    """One rank of a training run; `run()` trains from the newest committed checkpoint to max_steps."""

    def __init__(self, cfg: WorkerConfig):
        self.cfg, self.t = cfg, cfg.train
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.accum = grad_accum(cfg.global_batch_size, self.t.micro_batch_size, self.world)
        self.step = 0
        self.resumed = False

    # -- setup and resume ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """The DeepSpeed engine over a fresh model (identical on every rank), the data reader and the global order."""
        deepspeed = import_deepspeed()
        cfg, t = self.cfg, self.t
        self.manifest = read_manifest(cfg.layout.data.root)
        device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")  # (no Ray Train session needed)
        self.precision = _agree_on_precision(t.precision, device)
        used = cfg.global_batch_size / (self.world * self.accum * t.micro_batch_size)
        log_rank0(f"[train] {self.world} worker(s) × {self.accum} micro-batch(es) of ≤ {t.micro_batch_size}: global batch "
                  f"{cfg.global_batch_size} ({used:.0%} of the slots filled); precision {self.precision.precision}: "
                  f"{self.precision.reason}")
        if self.precision.warning:
            log_rank0(f"[train] warning: {self.precision.warning}")
        self.rss_at_start: float | None = memory()[0]  # before the model exists: what `raygpt plan` does not count
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = GPT(cfg.model)
        if cfg.init_from is not None:  # continued pretraining / fine-tuning: the base checkpoint's weights
            base = load_checkpoint(cfg.init_from).model.state_dict()
            if base["wte.weight"].shape[0] < cfg.model.vocab_size:  # chat tokens added to its vocabulary
                base = grow_embeddings(base, cfg.model.vocab_size)
            model.load_state_dict(base)
            log_rank0(f"[train] initialized from {cfg.init_from}")
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, t.weight_decay),
            config=deepspeed_config(t, cfg.use_gpu, self.precision.precision, self.accum),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, t)),
        )
        if t.compile:  # compiled on the first step; parameter names and checkpoints are those of the plain model
            self.engine.compile()
        self.train_data = SampleReader(cfg.layout.data.root, "train", self.manifest)
        self.val_data = SampleReader(cfg.layout.data.root, "val", self.manifest)
        self.sources = Sources(self.manifest, cfg.mixture, cfg.seed)  # the order of the samples, by source
        self.hooks = faults.hooks(cfg.faults)
        self.checkpointer = Checkpointer(cfg, self.engine, self.scheduler, self.hooks)
        self.preemption = preemption.Preemption(cfg.stop_actor)

    def resume(self) -> None:
        """From the newest committed checkpoint, whatever world size and ZeRO stage wrote it; each rank reads only
        its share (`trainer.checkpointer`)."""
        step = self.checkpointer.load()
        if step is None:
            return
        self.step, self.resumed = step, True
        read = self.checkpointer.resume_bytes
        log_rank0(f"[train] resumed at step {self.step} (written by {self.checkpointer.written_by} worker(s), now "
                  f"{self.world}); each rank read ≤ {max(read['resume_read_bytes']) / 1e6:,.1f} MB of the state's "
                  f"{read['resume_state_bytes'] / 1e6:,.1f} MB")

    # -- one step ----------------------------------------------------------------------------------------------------
    def train_step(self, data: StepData) -> tuple[torch.Tensor, np.ndarray]:
        """Forward, backward and (at the accumulation boundary) the optimizer step over this rank's micro-batches, each
        loss weighted so the step's gradient is the global batch's mean (`StepData`) — with a loss mask (chat data),
        the mean over the global batch's trained tokens, counted on every rank and summed (one all-reduce), so the
        same at any world size. Returns this rank's (loss sum, count: samples or trained tokens) and the time of each
        phase."""
        torch.manual_seed(step_seed(self.cfg.seed, data.step, self.rank))
        phases = np.zeros(len(PHASES))
        totals = torch.zeros(2)
        masked = self.manifest.loss_mask
        if masked:  # the trained tokens of the whole global batch
            trained = torch.tensor(float(sum(int(b[:, 1, 1:].sum()) for b in data.micro_batches if len(b))))
            dist.all_reduce(trained)
            data_weights = [self.world * self.accum / max(trained.item(), 1.0)] * len(data.micro_batches)
        else:
            data_weights = data.weights
        for blocks, weight in zip(data.micro_batches, data_weights):
            t0 = time.perf_counter()
            padding = len(blocks) == 0  # an empty slot: every rank must take part in every accumulation step
            inputs, targets, extra = model_batch(np.zeros((1, *self.manifest.block_shape)) if padding else blocks,
                                                 self.manifest, self.engine.device)
            t1 = time.perf_counter()
            loss = self.engine(inputs, targets=targets, **extra)[1]  # the (B, T, V) logits go now, not after the backward
            t2 = time.perf_counter()
            self.engine.backward(loss * weight)  # the gradient all-reduce / reduce-scatter at the accumulation boundary
            t3 = time.perf_counter()
            self.checkpointer.before_update()  # a save in flight has copied the weights
            self.engine.step()  # optimizer on this rank's partition, then the parameter all-gather (ZeRO ≥ 1)
            phases += np.array([t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3])
            if not padding:
                count = float((targets >= 0).sum()) if masked else float(len(blocks))
                totals += torch.stack([loss.detach().float().cpu() * (1.0 if masked else count), torch.tensor(count)])
        self.step = data.step + 1
        return totals, phases

    def evaluate(self) -> tuple[float, float]:
        """Mean val loss over the fixed val set (eval_batches × micro_batch_size blocks, split over the ranks, the same
        set at any world size) and bits per byte."""
        micro, count = self.t.micro_batch_size, self.t.eval_batches * self.t.micro_batch_size
        ids = val_ids(self.val_data.num_samples, count, self.rank, self.world)
        # every rank runs as many forwards as the rank with the most ids: under ZeRO-3 each forward gathers the
        # parameters from every rank, so a rank with fewer ids (or none) runs a padding batch that counts nothing
        share = len(val_ids(self.val_data.num_samples, count, 0, self.world))
        total = torch.zeros(2)
        masked = self.manifest.loss_mask  # the mean over the trained tokens, as in training
        self.engine.eval()
        with torch.no_grad():
            for i in range(0, share, micro):
                chosen = ids[i : i + micro]
                blocks = self.val_data.read_many(chosen) if len(chosen) else np.zeros((1, *self.manifest.block_shape))
                inputs, targets, extra = model_batch(blocks, self.manifest, self.engine.device)
                _, loss = self.engine(inputs, targets=targets, **extra)
                n = float((targets >= 0).sum()) if masked and len(chosen) else float(len(chosen))
                total += torch.tensor([loss.float().item() * (1.0 if masked else n), n])
        dist.all_reduce(total)
        self.engine.train()
        val_loss = (total[0] / total[1]).item()
        return val_loss, val_loss / math.log(2) * self.manifest.tokens_per_byte()

    # -- log ---------------------------------------------------------------------------------------------------------
    def open_logs(self) -> None:
        """Rank 0: the metrics file and the loggers (`train.loggers`), continued after a resume (later steps of an
        earlier attempt are dropped: they are about to run again)."""
        self.trackers = self.metrics_file = None
        if self.rank != 0:
            return
        layout = self.cfg.layout
        continue_metrics(layout, self.step if self.resumed else None)
        config = {"train": self.t.model_dump(mode="json"), "model": self.cfg.model.model_dump(mode="json"),
                  "seed": self.cfg.seed, "global_batch_size": self.cfg.global_batch_size}
        self.trackers = Trackers(self.t.loggers, layout, self.t.tracking_project, config, self.cfg.tracking_env,
                                 self.step if self.resumed else None)
        self.metrics_file = files.open_append(layout.metrics_local)

    def log(self, metrics: dict[str, Any], eta_s: float) -> None:
        """Rank 0: one progress line, one metrics.jsonl line, the scalars to the loggers."""
        if self.rank != 0 or self.metrics_file is None or self.trackers is None:
            return
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float) and k != "wall_time"}
        shown = " ".join(f"{k} {v:.4g}" for k, v in scalars.items() if not k.startswith("time_"))
        print(progress_line("train", "step", self.step, self.t.max_steps, f"{shown} eta {eta_s:.0f}s"), flush=True)
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        if len(self.sources.names) > 1:  # TensorBoard, W&B and MLflow plot each source's tokens and epoch
            scalars |= {f"{k}/{n}": float(v) for k in ("source_tokens", "source_epoch") for n, v in metrics.get(k, {}).items()}
        self.trackers.log(scalars, self.step)

    def close_logs(self) -> None:
        if self.trackers is not None and self.metrics_file is not None:
            self.trackers.close()
            self.metrics_file.close()
            upload_metrics(self.cfg.layout)
        self.train_data.close()
        self.val_data.close()

    # -- the loop ----------------------------------------------------------------------------------------------------
    def _flags(self, started: float, last_checkpoint: float, last_poll: float) -> tuple[bool, bool, bool]:
        """(out of time, checkpoint due by wall time, preemption poll due): rank 0's clock decides, so every rank stops,
        saves or polls at the same step."""
        t, now = self.t, time.perf_counter()
        flags = torch.tensor([float(t.time_budget_s is not None and now - started >= t.time_budget_s),
                              float(t.checkpoint_every_s is not None and now - last_checkpoint >= t.checkpoint_every_s),
                              float(now - last_poll >= preemption.POLL_S)])
        dist.broadcast(flags, src=0)
        return bool(flags[0]), bool(flags[1]), bool(flags[2])

    def _metrics(self, loss: torch.Tensor, data: StepData, window: float, steps: int, phases: np.ndarray,
                 started: float) -> dict[str, Any]:
        tokens_per_step = self.cfg.global_batch_size * self.manifest.seq_len
        tps = tokens_per_step * steps / window
        loss_value = loss.clone()
        dist.all_reduce(loss_value)  # the mean over the global batch's samples (chat: its trained tokens)
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, (sample_digests(data), memory(), self.rss_at_start))
        self.rss_at_start = None  # (reported once, in the first line)
        return {
            "step": self.step,
            "loss": (loss_value[0] / loss_value[1]).item(),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "tokens_per_sec": tps,
            "mfu": self._mfu(tps / self.world),
            "elapsed_s": time.perf_counter() - started,
            "wall_time": time.time(),  # unix time of the line: resizes and restarts show as gaps
            "precision": self.precision.precision,
            "world_size": self.world,
            "data_digest": batch_digest([digests for digests, _, _ in every]),
            # chat data: the tokens the step's loss is averaged over (assistant tokens of the global batch)
            **({"loss_tokens": int(loss_value[1].item())} if self.manifest.loss_mask else {}),
            # every rank's resident memory now and at its peak (GiB); in the first line also before the model existed
            "rss_gib": [rss for _, (rss, _), _ in every],
            "rss_peak_gib": [peak for _, (_, peak), _ in every],
            **({"rss_start_gib": [start for _, _, start in every]} if every[0][2] is not None else {}),
            # rank 0's profile of the window: where the time of a step goes, as fractions (the rest: logging,
            # reporting, the clock broadcast)
            **{f"time_{name}": float(t / window) for name, t in zip(PHASES, phases)},
            # on a GPU, rank 0's peak allocated memory so far (what `raygpt plan` estimates)
            **({"gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}),
        }

    def _mfu(self, tokens_per_sec: float) -> float | None:
        """This rank's MFU against the measured peak; above 1 it is None, with one warning per run."""
        value, warning = checked_mfu(tokens_per_sec, self.flops_per_token, self.peak)
        if warning is not None and not self.warned_mfu:
            self.warned_mfu = True
            log_rank0(f"[train] warning: {warning}")
        return value

    def run(self) -> str | None:
        """Train to max_steps (or the time budget); returns the reason it stopped early for a preemption notice."""
        t = self.t
        self.flops_per_token = flops_per_token(self.cfg.model, self.manifest.seq_len)
        self.peak = peak_flops(self.engine.device, self.precision.dtype, torch.get_num_threads(), self.cfg.model)
        self.warned_mfu = False
        self.open_logs()
        first_step, started = self.step, time.perf_counter()
        last_checkpoint = window_start = last_poll = started
        window_steps, phases = 0, np.zeros(len(PHASES))
        stopped, saving = None, 0.0
        data_iter = rank_steps(self.train_data, self.sources.order, self.step, self.cfg.global_batch_size, t.micro_batch_size,
                               self.rank, self.world)
        while self.step < t.max_steps:
            liveness.check(self.cfg.driver, self.rank, self.step)
            t0 = time.perf_counter()
            data = next(data_iter)
            loss, step_phases = self.train_step(data)
            step_phases[0] += time.perf_counter() - t0 - step_phases.sum()  # waiting for the reader counts as data
            phases += step_phases
            window_steps += 1
            self.hooks.after_step(self.step, self.rank, self.world)
            out_of_time, checkpoint_due, poll = self._flags(started, last_checkpoint, last_poll)
            last_poll = time.perf_counter() if poll else last_poll
            stopped = self.preemption.check(poll)
            last = self.step == t.max_steps or out_of_time
            metrics: dict[str, Any] = {}
            if self.step % t.log_every == 0 or last or stopped:
                metrics = self._metrics(loss, data, time.perf_counter() - window_start, window_steps, phases, started)
                window_start, window_steps, phases = time.perf_counter(), 0, np.zeros(len(PHASES))
                metrics |= self.checkpointer.resume_bytes  # the first line after a resume: what each rank read
                self.checkpointer.resume_bytes = {}
                if saving:  # how long training waited in checkpoint saves since the last line
                    metrics["checkpoint_s"], saving = saving, 0.0
            if self.step % t.eval_every == 0 or last:
                metrics["val_loss"], metrics["val_bpb"] = self.evaluate()
            if metrics:
                metrics.setdefault("step", self.step)
                metrics.setdefault("tokens", self.step * self.cfg.global_batch_size * self.manifest.seq_len)
                metrics.update(self.sources.metrics(self.step, self.cfg.global_batch_size, self.manifest.seq_len))
                self.log(metrics, (t.max_steps - self.step) * (time.perf_counter() - started) / max(self.step - first_step, 1))
            if self.step % t.checkpoint_every == 0 or last or checkpoint_due or stopped:
                began = time.perf_counter()
                self.checkpointer.save(self.step)
                last_checkpoint = time.perf_counter()
                saving += last_checkpoint - began
            if stopped:
                self.checkpointer.wait()  # committed before anyone leaves
                log_rank0(f"[train] {stopped}: step {self.step} is committed; stopping there")
            if out_of_time or stopped:
                break
        self.checkpointer.wait()
        data_iter.close()  # stops the read-ahead thread before its readers close
        self.close_logs()
        return stopped if self.step < t.max_steps else None  # a notice at the last step stops nothing


def model_batch(blocks: np.ndarray, manifest: Manifest, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Blocks → (inputs (B, T), targets (B, T), the model's other arguments). Chat blocks (B, 2, T + 1): targets are
    -1 where the mask is 0, the loss is summed (the caller divides by the global count), and the packed
    conversations are kept apart by `segments` (a new one after each end-of-text)."""
    if not manifest.loss_mask:
        batch = torch.from_numpy(blocks.astype(np.int64)).to(device)
        return batch[:, :-1], batch[:, 1:], {}
    ids, mask = blocks[:, 0].astype(np.int64), blocks[:, 1] != 0
    inputs = ids[:, :-1]
    ended = inputs == manifest.eot_id
    segments = np.cumsum(ended, axis=1) - ended  # (B, T): end-of-texts before each token; an end-of-text is its document's
    targets = np.where(mask[:, 1:], ids[:, 1:], -1)
    return (torch.from_numpy(inputs).to(device), torch.from_numpy(targets).to(device),
            {"segments": torch.from_numpy(segments).to(device), "reduction": "sum"})


def train_loop_per_worker(config: dict[str, WorkerConfig]) -> dict[str, Any] | None:
    """Ray Train's entry point on every worker (`train_loop_config` holds the WorkerConfig)."""
    cfg = config["worker"]
    context = ray.train.get_context()
    print(f"[train] rank {context.get_world_rank()}/{context.get_world_size()} on node "
          f"{ray.get_runtime_context().get_node_id()} ({ray.util.get_node_ip_address()})", flush=True)
    worker = Worker(cfg)
    worker.setup()
    worker.resume()
    stopped = worker.run()
    return {"stopped": stopped, "step": worker.step} if stopped else None
