"""`raygpt serve` under load: 16 concurrent clients × 64 new tokens against the server (continuous batching), next to
the same requests sent one after another to the same server as the baseline, in the same run. Prints aggregate new
tokens/s of both, their ratio, and p50 / p99 latency to the first streamed token under each.

    .venv/bin/python benchmarks/serve_throughput.py [--run-dir runs/demo] [--clients 16] [--tokens 64] [--rounds 2]

Greedy decoding, streamed responses (the first chunk's arrival is the time to first token); the new tokens counted
are those the server reports (stream_options.include_usage), so a request that ends early at end-of-text counts
what it made. One replica with every core of this machine (serve.num_cpus), serve.max_batch = --clients.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = ["def ", "import os\n", "class Config:\n", "for i in range(", "if __name__ == ", "return ", "with open(",
           "try:\n    ", "from typing import ", "self.", "raise ValueError(", "print(", "while True:\n",
           "async def ", "@property\ndef ", "# Copyright"]


def one(url: str, model: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, total seconds, new tokens) of one streamed greedy completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started, first, made = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                first = first or time.perf_counter() - started
            if chunk.get("usage"):
                made = chunk["usage"]["completion_tokens"]
    return first or time.perf_counter() - started, time.perf_counter() - started, made


def measure(url: str, model: str, prompts: list[str], tokens: int, together: bool) -> dict[str, float]:
    started = time.perf_counter()
    if together:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: one(url, model, p, tokens), prompts))
    else:
        results = [one(url, model, p, tokens) for p in prompts]
    wall = time.perf_counter() - started
    ttft = sorted(r[0] for r in results)
    return {"tokens_per_s": sum(r[2] for r in results) / wall, "wall_s": wall, "ttft_p50": statistics.median(ttft),
            "ttft_p99": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "demo"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from ray import serve

    from cluster.ray_connect import start_local
    from cluster.serve import start, stop
    from cluster.serve_launch import resolve_target

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cores = os.cpu_count() or 1
    target = resolve_target(args.run_dir, [f"serve.port={port}", f"serve.max_batch={args.clients}",
                                           f"serve.num_cpus={cores}"])
    start_local(cores, log_to_driver=False)
    url = start(target.checkpoint, target.serve, target.model_name)
    prompts = (PROMPTS * (args.clients // len(PROMPTS) + 1))[: args.clients]
    one(url, target.model_name, "warm up", 8)
    runs: dict[str, list[dict[str, float]]] = {"sequential": [], "concurrent": []}
    for _ in range(args.rounds):  # alternating, so drift hits both alike
        runs["sequential"].append(measure(url, target.model_name, prompts, args.tokens, together=False))
        runs["concurrent"].append(measure(url, target.model_name, prompts, args.tokens, together=True))
    stop()
    serve.shutdown()

    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, {cores} cores; checkpoint "
          f"{target.checkpoint}; {args.clients} requests × {args.tokens} new tokens, greedy, streamed; "
          f"best of {args.rounds} rounds")
    best = {name: max(r, key=lambda m: m["tokens_per_s"]) for name, r in runs.items()}
    print(f"{'requests':34s} {'tokens/s':>9s} {'wall s':>7s} {'TTFT p50':>9s} {'TTFT p99':>9s}")
    for name, label in (("sequential", "one after another (baseline)"), ("concurrent", f"{args.clients} concurrent clients")):
        m = best[name]
        print(f"{label:34s} {m['tokens_per_s']:9.1f} {m['wall_s']:7.2f} {m['ttft_p50']:8.3f}s {m['ttft_p99']:8.3f}s")
    print(f"ratio (concurrent / sequential tokens/s): {best['concurrent']['tokens_per_s'] / best['sequential']['tokens_per_s']:.2f}×")


if __name__ == "__main__":
    main()
