"""Decoding with and without torch.compile, same model, same run: greedy tokens/s of `model.generate` eager and with
`compile=True`, batch 1 and batch 8, alternating rounds (median), plus the one-time compile cost and whether the
greedy tokens agree.

    .venv/bin/python benchmarks/decode_compile.py [--presets tiny gpt2-124m] [--tokens 128] [--rounds 3] [--device cpu]

Models are randomly initialised presets (speed does not depend on the weights); on a CPU in fp32, on a GPU in bf16.
Prints one markdown table; the figures in the README name the CPU (`torch.backends.cpu.get_cpu_capability()`).
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
from model.generate import generate_tokens  # noqa: E402
from model.gpt import GPT, ModelConfig  # noqa: E402


def decode(model: GPT, prompt: torch.Tensor, tokens: int, compile: bool) -> tuple[float, list[int]]:
    """Seconds for `tokens` greedy steps of every row, and row 0's tokens."""
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = [t[0].item() for t in generate_tokens(model, prompt, tokens, compile=compile)]
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["tiny", "gpt2-124m"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(machine_header() if args.device == "cpu" else f"GPU: {torch.cuda.get_device_name()}")
    print(f"greedy decode, 16-token prompt + {args.tokens} new tokens, {str(dtype).removeprefix('torch.')}, "
          f"median of {args.rounds} alternating rounds")
    print("| model | batch | eager tokens/s | compiled tokens/s | compiled / eager | first compiled call s | same tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for preset in args.presets:
        torch.manual_seed(0)
        model = GPT(ModelConfig.preset(preset)).to(args.device, dtype).eval()
        tokens = min(args.tokens, model.cfg.block_size - 16)
        for batch in args.batches:
            prompt = torch.randint(0, model.cfg.vocab_size, (batch, 16), device=args.device)
            decode(model, prompt, tokens, compile=False)  # warm-up
            first, _ = decode(model, prompt, tokens, compile=True)  # compiles (once per batch size)
            eager, compiled = [], []
            for _ in range(args.rounds):
                seconds, eager_tokens = decode(model, prompt, tokens, compile=False)
                eager.append(seconds)
                seconds, compiled_tokens = decode(model, prompt, tokens, compile=True)
                compiled.append(seconds)
            rate = {k: batch * tokens / statistics.median(v) for k, v in (("eager", eager), ("compiled", compiled))}
            same = sum(a == b for a, b in zip(eager_tokens, compiled_tokens))
            print(f"| {preset} | {batch} | {rate['eager']:,.0f} | {rate['compiled']:,.0f} "
                  f"| {rate['compiled'] / rate['eager']:.2f}× | {first:.1f} | {same}/{tokens} |", flush=True)


if __name__ == "__main__":
    main()
