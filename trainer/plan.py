"""`raygpt plan`: will a run fit these GPUs, and how long will it take? Answered on paper, without starting anything.

    raygpt plan configs/cloud_gpu.yaml --gpus 8 --gpu h100
    raygpt plan configs/cloud_gpu.yaml model.preset=llama-7b --gpus 8 --gpu h100 --tokens 2e12 --mfu 0.45

For every ZeRO stage (and CPU offload) it prints the memory per GPU of the model states — 16-bit parameters and
gradients, fp32 master weights, gradients and Adam moments, partitioned as the stage partitions them — and of the
activations of one sequence with and without activation checkpointing, whether the configured micro-batch fits and
the largest one that does. Then the configured run's step time, tokens per day, the time to train `--tokens` and its
GPU-hours at a stated MFU. Every figure is an estimate of the usual kind:

- model states (bytes per parameter Ψ, mixed precision with Adam, N GPUs): ZeRO-0 2Ψ + 2Ψ + 16Ψ; ZeRO-1 4Ψ + 16Ψ/N;
  ZeRO-2 2Ψ + 18Ψ/N; ZeRO-3 18Ψ/N + 4·(largest layer), DeepSpeed's own estimators for stages 2 and 3
  (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_…`; a test checks we agree); offloading the optimizer
  leaves 2Ψ (ZeRO-2) or 2Ψ/N + 4·largest layer (ZeRO-3), offloading parameters too leaves 4·largest layer;
- buffers the estimators leave out, found by measuring (benchmarks/plan_memory.py, `buffers`): ZeRO 1–3's gradient
  bucket (2 bytes × `reduce_bucket_size`, 5e8 by default) and ZeRO-3's live parameters (2·min(Ψ, 1e9));
- activations per sequence of T tokens, bf16, attention through SDPA's flash / memory-efficient kernels (no T×T score
  matrix is kept): per layer 2·T·(4C + 2·C_kv) for the attention block and 2·T·k·H for the MLP (k = 4 for SwiGLU: gate,
  up, activation, product; 2 for GELU), plus 12·T·V for the logits and their fp32 loss at the backward's peak
  (the log-softmax the loss keeps, its gradient and the gradient it passes on: 4 bytes each; measured, see
  benchmarks/plan_memory.py); with activation checkpointing
  each layer keeps its 2·T·C input and one layer at a time holds its full activations;
- reserved: 1 GiB of CUDA context and 10% of the card for fragmentation and communication buffers;
- time: FLOPs per token 6·N + 12·L·C·T (model/flops.py) at `--mfu` of the GPU's dense bf16/fp16 peak; activation
  checkpointing adds a forward pass (×4/3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import UserError
from model.config import ModelConfig
from model.flops import flops_per_token
from model.hardware import GPUS, GiB, Gpu
from trainer.config import TrainConfig

OVERHEAD_BYTES = GiB
FRAGMENTATION = 0.10


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, parameters of the largest single module) of `model.gpt.GPT(cfg)`, counted without building it;
    a tied output projection counts once."""
    C, H, V, hs = cfg.n_embd, cfg.hidden_size, cfg.vocab_size, cfg.head_size
    bias = int(cfg.bias)
    norm = C * (1 if cfg.norm == "rmsnorm" else 1 + bias)
    qkv = C * (cfg.n_head + 2 * cfg.kv_heads) * hs + bias * (cfg.n_head + 2 * cfg.kv_heads) * hs
    proj = C * C + bias * C
    up = C * H + bias * H
    down = H * C + bias * C
    mlp = up * (2 if cfg.mlp == "swiglu" else 1) + down
    layer = 2 * norm + qkv + proj + mlp
    embeddings = V * C + (cfg.block_size * C if cfg.pos_encoding == "learned" else 0)
    head = 0 if cfg.tie_embeddings else V * C
    total = embeddings + cfg.n_layer * layer + norm + head
    return total, max(V * C, qkv, up, down)


def _estimated(p: float, n: int, working: float, zero: int, offload: str) -> dict[str, float]:
    """DeepSpeed's own estimate (see the module docstring): parameters, gradients, optimizer states."""
    if zero == 3:
        if offload == "optimizer+params":
            return {"params": working, "grads": 0.0, "optimizer": 0.0}
        if offload == "optimizer":
            return {"params": working + 2 * p / n, "grads": 0.0, "optimizer": 0.0}
        return {"params": working + 2 * p / n, "grads": 2 * p / n, "optimizer": 14 * p / n}  # 4 + 2 + 16 - 2 = 18 /N
    if offload == "optimizer":  # ZeRO-2 (DeepSpeed offloads from stage 1 up; its estimator is for stage 2)
        return {"params": 2 * p, "grads": 0.0, "optimizer": 0.0}
    if zero == 2:
        return {"params": 2 * p, "grads": 2 * p / n, "optimizer": 16 * p / n}
    if zero == 1:
        return {"params": 2 * p, "grads": 2 * p, "optimizer": 16 * p / n}
    return {"params": 2 * p, "grads": 2 * p, "optimizer": 16 * p}


def buffers(params: int, zero: int, zero_config: dict[str, Any] | None = None, resident: bool = False) -> float:
    """Bytes per GPU DeepSpeed holds beyond its estimators' model states, with its defaults or `zero_config`'s
    settings (`train.deepspeed.zero_optimization`): measured by benchmarks/plan_memory.py, which its estimators miss.
    - ZeRO 1–3 with contiguous gradients (the default): a gradient bucket of `reduce_bucket_size` 16-bit elements
      (5e8: 0.93 GiB), two with `overlap_comm` at stages 1–2; ZeRO-3 allocates it at start, 1–2 at every backward.
    - ZeRO-3: the live-parameter cache. With the default `stage3_max_reuse_distance`, a parameter gathered in the
      forward stays gathered until the backward uses it again, up to `stage3_max_live_parameters` (1e9) elements:
      the whole model in 16 bits, for any model under a billion parameters.
    `resident`: the bytes a CPU worker's memory really holds — a bucket's pages never written (beyond the model's
    gradients) are not resident, while a GPU's allocator counts the whole bucket."""
    settings = zero_config or {}
    if zero == 0:
        return 0.0
    bucket = 0.0
    if settings.get("contiguous_gradients", True):
        elements = float(settings.get("reduce_bucket_size", 5e8))
        copies = 2 if zero < 3 and settings.get("overlap_comm", False) else 1
        bucket = copies * 2 * (min(elements, params) if resident else elements)
    live = 2 * min(float(params), float(settings.get("stage3_max_live_parameters", 1e9))) if zero == 3 else 0.0
    return bucket + live


def model_states(params: int, largest: int, zero: int, gpus: int, offload: str = "none",
                 zero_config: dict[str, Any] | None = None, resident: bool = False) -> dict[str, float]:
    """Bytes per GPU of parameters, gradients and optimizer states as DeepSpeed's estimators count them, and the
    buffers they leave out (`buffers`)."""
    states = _estimated(float(params), gpus, 4.0 * largest, zero, offload)
    return {**states, "buffers": buffers(params, zero, zero_config, resident)}


def activations(cfg: ModelConfig, seq_len: int, checkpointing: bool) -> float:
    """Bytes of activations kept for the backward pass of one sequence of `seq_len` tokens (bf16)."""
    T, C, kv = seq_len, cfg.n_embd, cfg.kv_heads * cfg.head_size
    layer = 2 * T * (4 * C + 2 * kv) + 2 * T * (4 if cfg.mlp == "swiglu" else 2) * cfg.hidden_size
    logits = 12 * T * cfg.vocab_size  # fp32 log-softmax kept (4), at the backward its gradient in and out (4 + 4)
    if checkpointing:
        return cfg.n_layer * 2 * T * C + layer + logits
    return cfg.n_layer * layer + logits


@dataclass(frozen=True)
class Row:
    zero: int
    offload: str
    states: dict[str, float]
    act: float
    act_ckpt: float
    usable: float

    def fits(self, micro_batch: int, checkpointing: bool) -> bool:
        return sum(self.states.values()) + micro_batch * (self.act_ckpt if checkpointing else self.act) <= self.usable

    def largest_micro_batch(self, checkpointing: bool) -> int:
        room = self.usable - sum(self.states.values())
        return max(0, int(room // (self.act_ckpt if checkpointing else self.act)))


def throughput(model: ModelConfig, gpus: int, card: Gpu, precision: str, mfu: float, checkpointing: bool) -> float:
    """Tokens/s of `gpus` cards at `mfu` of their dense peak (activation checkpointing: one more forward, ×4/3)."""
    per_token = flops_per_token(model, model.block_size) * (4 / 3 if checkpointing else 1)
    return gpus * card.peak[precision] * mfu / per_token


def _gib(x: float) -> str:
    return f"{x / GiB:,.1f}"


def _count(tokens: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if tokens >= size:
            return f"{tokens / size:,.2f}{unit}"
    return f"{tokens:,.0f}"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def plan(model: ModelConfig, label: str, t: TrainConfig, global_batch_size: int, gpus: int, gpu: str,
         tokens: float | None = None, mfu: float = 0.4) -> str:
    """The plan as text: a memory table per ZeRO stage, then the configured run's time and cost. `model` is the
    architecture the run trains (named `label`), `t` its train section and `global_batch_size` its sequences per step
    on `gpus` workers (`TrainConfig.resolved_global_batch`)."""
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu!r}: unknown GPU (known: {', '.join(GPUS)})")
    if gpus < 1 or not 0 < mfu <= 1:
        raise UserError("--gpus must be at least 1 and --mfu in (0, 1]")
    card: Gpu = GPUS[gpu]
    params, largest = count_params(model)
    T = model.block_size
    usable = card.memory * (1 - FRAGMENTATION) - OVERHEAD_BYTES
    act, act_ckpt = activations(model, T, False), activations(model, T, True)
    zero_config = t.deepspeed.get("zero_optimization", {})
    rows = [Row(z, o, model_states(params, largest, z, gpus, o, zero_config), act, act_ckpt, usable)
            for z, o in [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (2, "optimizer"), (3, "optimizer"),
                         (3, "optimizer+params")]]
    offload = "optimizer+params" if t.offload_params else "optimizer" if t.offload_optimizer else "none"
    ckpt = model.activation_checkpointing
    precision = "bf16" if "bf16" in card.peak and t.precision in ("auto", "bf16") else "fp16"
    if t.precision == "fp32":
        precision = "fp32"
    lines = [
        f"[plan] {label}: {params / 1e9:.3f}B "
        f"parameters, context {T}, vocab {model.vocab_size:,}; {gpus} × {card.name} ({_gib(card.memory)} GiB, "
        f"{card.peak[precision] / 1e12:,.0f} TFLOP/s {precision} dense); usable per GPU {_gib(usable)} GiB",
        f"[plan] activations per sequence: {_gib(act)} GiB, {_gib(act_ckpt)} GiB with activation checkpointing",
        "",
        "| ZeRO | offload | params GiB | grads GiB | optimizer GiB | buffers GiB | states GiB | micro-batch "
        f"{t.micro_batch_size} fits | largest micro-batch | with checkpointing |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        mine = " ←" if (row.zero, row.offload) == (t.zero_stage, offload) else ""
        fits = "yes" if row.fits(t.micro_batch_size, ckpt) else "no"
        lines.append(
            f"| {row.zero}{mine} | {row.offload} | {_gib(row.states['params'])} | {_gib(row.states['grads'])} | "
            f"{_gib(row.states['optimizer'])} | {_gib(row.states['buffers'])} | {_gib(sum(row.states.values()))} | {fits} | "
            f"{row.largest_micro_batch(False)} | {row.largest_micro_batch(True)} |")
    per_token = flops_per_token(model, T) * (4 / 3 if ckpt else 1)
    rate = throughput(model, gpus, card, precision, mfu, ckpt)  # tokens/s of the whole cluster
    batch = global_batch_size
    total = tokens if tokens is not None else float(t.max_steps * batch * T)
    seconds = total / rate
    lines += [
        "",
        f"[plan] at {mfu:.0%} MFU ({per_token / 1e9:.2f} GFLOP per token{', ×4/3 for checkpointing' if ckpt else ''}): "
        f"{rate:,.0f} tokens/s, {_count(rate * 86400)} tokens/day; a step of {batch} × {T} tokens "
        f"{batch * T / rate:.2f} s",
        f"[plan] {_count(total)} tokens{'' if tokens is not None else f' ({t.max_steps} steps)'}: "
        f"{_duration(seconds)} on {gpus} GPU(s), {seconds * gpus / 3600:,.0f} GPU-hours",
    ]
    chosen = next(r for r in rows if (r.zero, r.offload) == (t.zero_stage, offload))
    verdict = "fits" if chosen.fits(t.micro_batch_size, ckpt) else "does NOT fit"
    lines.append(f"[plan] the configured run (ZeRO-{t.zero_stage}, offload {offload}, micro-batch "
                 f"{t.micro_batch_size}, activation checkpointing {'on' if ckpt else 'off'}) {verdict}")
    return "\n".join(lines)
