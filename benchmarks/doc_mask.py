"""What document masking costs a training step: forward + backward of our GPT on packed blocks with `segments`
(SDPA with a boolean (B, 1, T, T) mask: attention inside each packed conversation, positions from 0 in each) against
the same blocks with plain causal attention (`is_causal`, what pretraining runs), same weights, same run.

    .venv/bin/python benchmarks/doc_mask.py [--presets tiny gpt2-124m] [--seq-len 256 1024] [--steps 5]

Why SDPA's mask rather than FlexAttention: FlexAttention runs only compiled (torch.compile) and its CPU path is a
template without the fused kernels of CUDA, while SDPA takes any boolean mask on every device (its math or
memory-efficient kernel; on CUDA the flash kernel does not take a mask, so a masked step falls back to the
memory-efficient one). The mask costs T² bytes per row: 1 MiB per block at T = 1024, 16 MiB at 4096.
Blocks hold documents of ~200 tokens (GSM8K conversations' length), so there are several per block.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.flops import machine_header  # noqa: E402
from model.gpt import GPT, ModelConfig  # noqa: E402


def step_time(model: GPT, idx: torch.Tensor, segments: torch.Tensor | None, steps: int, dtype: torch.dtype) -> float:
    """Median seconds of forward + backward (the first run warms up)."""
    times = []
    for i in range(steps + 1):
        model.zero_grad(set_to_none=True)
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(idx[:, :-1], targets=idx[:, 1:], segments=segments)[1]
        loss.backward()
        if i:
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "gpt2-124m"])
    parser.add_argument("--seq-len", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--doc-len", type=int, default=200, help="tokens per packed document")
    args = parser.parse_args()
    print(machine_header())
    dtype = torch.bfloat16 if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") else torch.float32
    print("| preset | seq_len | causal tok/s | document mask tok/s | masked / causal | dtype |")
    print("| --- | --- | --- | --- | --- | --- |")
    for preset in args.presets:
        for seq_len in args.seq_len:
            torch.manual_seed(0)
            model = GPT(ModelConfig.preset(preset, vocab_size=8192, block_size=seq_len, dropout=0.0)).train()
            idx = torch.randint(0, 8192, (args.batch, seq_len + 1))
            segments = (torch.arange(seq_len) // args.doc_len).expand(args.batch, seq_len).contiguous()
            causal = step_time(model, idx, None, args.steps, dtype)
            masked = step_time(model, idx, segments, args.steps, dtype)
            tokens = args.batch * seq_len
            print(f"| {preset} | {seq_len} | {tokens / causal:,.0f} | {tokens / masked:,.0f} | {causal / masked:.2f}× "
                  f"| {str(dtype).removeprefix('torch.')} |", flush=True)


if __name__ == "__main__":
    main()
