"""FLOPs per token and model FLOPs utilization (MFU): a peak table for GPUs (model/hardware.py), a measured peak for CPUs.

    python -m model.flops            # prints this machine's measured CPU peak per dtype

A CPU's peak for MFU is measured the way training runs (`training_peak`): the model's own matmuls (`F.linear` at its
attention, MLP and output shapes, forward and both backward products) in the training dtype, with autograd, the best
of them. A bare square matmul is not enough: on a CPU that emulates bf16 (AVX2), `a @ b` of two bf16 tensors runs a
slow reference kernel while `F.linear` in training takes a faster path, and the MFU came out above 1. An MFU above 1
is still possible on a noisy machine; `checked_mfu` then reports None with one warning naming both rates.

FLOPs per trained token = 6·N + 12·n_layer·n_embd·T (PaLM, appendix B): N counts the parameters used in matmuls
(everything but the embedding lookup tables; a tied output projection counts once), the second term is attention
scores and values over a context of T. A forward pass alone is a third of that.
"""

from __future__ import annotations

import os
import platform
import time
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from core.files import read_json, write_json
from core.layout import cache_dir
from model.config import ModelConfig
from model.hardware import gpu_named


def _peak_cache() -> Path:
    return cache_dir() / "cpu_peak.json"



def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in matmuls per token: attention, MLP and output projection (biases and norms are noise)."""
    hs, C = cfg.head_size, cfg.n_embd
    attn = C * (cfg.n_head + 2 * cfg.kv_heads) * hs + C * C
    mlp = (3 if cfg.mlp == "swiglu" else 2) * C * cfg.hidden_size
    return cfg.n_layer * (attn + mlp) + C * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """FLOPs to process one token at context seq_len: 6N + 12·L·C·T for a training step, a third for a forward."""
    total = 6 * matmul_params(cfg) + 12 * cfg.n_layer * cfg.n_embd * seq_len
    return total if training else total / 3


def _machine_key(dtype: torch.dtype, threads: int) -> str:
    """What a CPU measurement depends on: the CPU, cores, threads, dtype, dispatch capability and forced ISAs."""
    import torch

    isa = f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '')}/{os.environ.get('MKL_ENABLE_INSTRUCTIONS', '')}"  # forced ISAs
    return (f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{threads}|{dtype}|"
            f"{torch.backends.cpu.get_cpu_capability()}|{isa}")


@cache
def measured_cpu_peak(dtype: torch.dtype, threads: int) -> float:
    """FLOP/s of a 512² matmul on this CPU with `threads` threads (`measured_cpu_peaks`)."""
    return measured_cpu_peaks((dtype,), threads)[dtype]


def measured_cpu_peaks(dtypes: tuple[torch.dtype, ...], threads: int) -> dict[torch.dtype, float]:
    """FLOP/s of a 512² matmul per dtype on this CPU with `threads` threads, timed together for ~0.3 s per dtype
    (bounded, so an emulated dtype costs about a second, not minutes); cached on disk per CPU model, dispatch
    capability and forced ISA. The dtypes' timings alternate, so a burst of other work on the machine (another rank
    starting) slows them alike: `precision: auto` decides on their ratio."""
    import torch  # here, not at the top: `raygpt plan` counts FLOPs without torch

    keys = {dtype: _machine_key(dtype, threads) for dtype in dtypes}
    stored = read_json(_peak_cache(), "peak FLOP/s cache") if _peak_cache().is_file() else {}
    if all(key in stored for key in keys.values()):
        return {dtype: float(stored[key]) for dtype, key in keys.items()}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    n = 512
    gen = torch.Generator().manual_seed(0)  # never the global RNG: measuring must not change a training run
    pairs = {d: (torch.randn(n, n, generator=gen).to(d), torch.randn(n, n, generator=gen).to(d)) for d in dtypes}
    best, spent = dict.fromkeys(dtypes, float("inf")), 0.0
    for a, b in pairs.values():
        a @ b  # warm-up
    for i in range(50):  # best of up to 50 rounds of 2 matmuls per dtype, stopping after 0.3 s per dtype (≥ 3 rounds)
        for dtype, (a, b) in pairs.items():
            start = time.perf_counter()
            a @ b
            a @ b
            took = time.perf_counter() - start
            best[dtype], spent = min(best[dtype], took / 2), spent + took
        if spent > 0.3 * len(dtypes) and i >= 2:
            break
    torch.set_num_threads(previous)
    peaks = {dtype: 2 * n**3 / took for dtype, took in best.items()}
    stored = read_json(_peak_cache(), "peak FLOP/s cache") if _peak_cache().is_file() else {}
    write_json(_peak_cache(), {**stored, **{keys[d]: p for d, p in peaks.items()}})  # each writer: a whole file
    return peaks


def matmul_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) features of the model's distinct matmuls: attention in and out, the MLP up and down, the output."""
    hs, C = cfg.head_size, cfg.n_embd
    return sorted({(C, (cfg.n_head + 2 * cfg.kv_heads) * hs), (C, C), (C, cfg.hidden_size), (cfg.hidden_size, C),
                   (C, cfg.vocab_size)})


ROWS = 512
"""Rows (tokens) of the measured products: enough for a matmul to reach its rate, few enough for an emulated dtype."""


def training_peak(cfg: ModelConfig, dtype: torch.dtype, threads: int) -> float:
    """FLOP/s of the model's own matmuls as training runs them on this CPU: for each (in, out) shape, `F.linear` of
    ROWS tokens forward and backward in `dtype` with autograd (3 products), timed up to ~0.3 s; the best shape.
    Cached on disk like `measured_cpu_peak` (per CPU, capability, forced ISA, threads, dtype and shapes)."""
    import torch  # here, not at the top: `raygpt plan` counts FLOPs without torch

    shapes = matmul_shapes(cfg)
    key = f"linear|{_machine_key(dtype, threads)}|{ROWS}|{shapes}"
    stored = read_json(_peak_cache(), "peak FLOP/s cache") if _peak_cache().is_file() else {}
    if key in stored:
        return float(stored[key])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)  # never the global RNG: measuring must not change a training run
    best = 0.0
    for n_in, n_out in shapes:
        x = torch.randn(ROWS, n_in, generator=gen).to(dtype).requires_grad_()
        w = torch.randn(n_out, n_in, generator=gen).to(dtype).requires_grad_()
        grad = torch.randn(ROWS, n_out, generator=gen).to(dtype)  # dense, like a real gradient (not `.sum()`'s expand)
        fastest, spent = float("inf"), 0.0
        for i in range(20):  # the first is a warm-up; at least 3 timings, then until 0.3 s are spent
            start = time.perf_counter()
            torch.nn.functional.linear(x, w).backward(grad)
            took = time.perf_counter() - start
            if i:
                fastest, spent = min(fastest, took), spent + took
            if spent > 0.3 and i >= 3:
                break
        best = max(best, 3 * 2 * ROWS * n_in * n_out / fastest)
    torch.set_num_threads(previous)
    write_json(_peak_cache(), {**stored, key: best})
    return best


def checked_mfu(tokens_per_sec: float, flops_per_tok: float, peak_per_device: float | None,
                devices: int = 1) -> tuple[float | None, str | None]:
    """(MFU, warning): the MFU, or None with a one-line warning naming the peak and the achieved FLOP/s when it is
    above 1 — a measured peak below what training achieves is a bug of the peak, never a number for a table."""
    value = mfu(tokens_per_sec, flops_per_tok, peak_per_device, devices)
    if value is None or value <= 1:
        return value, None
    achieved = tokens_per_sec * flops_per_tok / devices
    return None, (f"MFU {value:.2f} is above 1: achieved {achieved / 1e9:,.1f} GFLOP/s per device against a measured "
                  f"peak of {peak_per_device / 1e9:,.1f} GFLOP/s (model.flops); MFU is left out of the metrics")


def peak_flops(device: torch.device | str, dtype: torch.dtype, threads: int | None = None,
               model: ModelConfig | None = None) -> float | None:
    """Peak FLOP/s of one device: the table for known GPUs; on a CPU the measured rate of `model`'s own matmuls in
    training (`training_peak`), or of a square matmul without a model; None for an unknown device."""
    import torch  # here, not at the top: `raygpt plan` counts FLOPs without torch

    device = torch.device(device)
    if device.type == "cpu":
        threads = threads or torch.get_num_threads()
        return training_peak(model, dtype, threads) if model is not None else measured_cpu_peak(dtype, threads)
    if device.type == "cuda":
        gpu = gpu_named(torch.cuda.get_device_name(device))
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, "")
        return gpu.peak.get(precision) if gpu is not None else None
    return None


def mfu(tokens_per_sec: float, flops_per_tok: float, peak_per_device: float | None, devices: int = 1) -> float | None:
    """Achieved FLOP/s over the peak of all devices; None when the peak is unknown (never a guess)."""
    if peak_per_device is None:
        return None
    return tokens_per_sec * flops_per_tok / (peak_per_device * devices)


def machine_header(threads: int | None = None) -> str:
    """One line for benchmark output: CPU capability, thread count and measured peak per dtype (or the GPU)."""
    import torch  # here, not at the top: `raygpt plan` counts FLOPs without torch

    threads = threads or torch.get_num_threads()
    peaks = ", ".join(f"{name} {measured_cpu_peak(dt, threads) / 1e9:,.1f}" for name, dt in
                      (("fp32", torch.float32), ("bf16", torch.bfloat16)))
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"machine: {platform.processor() or platform.machine()}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, {threads} torch threads; "
            f"measured matmul peak GFLOP/s: {peaks}{gpu}")


if __name__ == "__main__":
    print(machine_header())
