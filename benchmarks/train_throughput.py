"""Training throughput of `raygpt train` (Ray Train, 2 DeepSpeed workers, bf16, ZeRO-1) against a plain
single-process PyTorch loop (fp32, torch on every core) on the same model and global batch, in one run.
Also 1 → 2 worker scaling efficiency of `raygpt train` (same micro-batch per worker).

    .venv/bin/python benchmarks/train_throughput.py [--steps 30]

Data: tinyshakespeare shards (vocab 2048, seq_len 256) prepared into a temp folder. Model: the `tiny` preset.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster import pipeline  # noqa: E402
from cluster.config import load_config  # noqa: E402
from model.flops import flops_per_token, mfu, peak_flops  # noqa: E402
from model.gpt import GPT  # noqa: E402
from trainer.data import ShardStream  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MICRO = 8


def _raygpt(run_dir: Path, workers: int, steps: int) -> float:
    """Median tokens/s of the logged windows after the first (which includes start-up)."""
    cfg = load_config(
        REPO / "configs" / "shakespeare.yaml",
        [f"run_dir={run_dir}", "model.overrides={}", f"train.max_steps={steps}", "train.log_every=5",
         f"train.eval_every={steps}", "train.eval_batches=1", f"train.checkpoint_every={steps}",
         "train.time_budget_s=null", f"train.micro_batch_size={MICRO}", f"cluster.num_workers={workers}",
         "train.precision=bf16", "train.zero_stage=1"],
    )
    pipeline.run_train(cfg)
    windows = [json.loads(line)["tokens_per_sec"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(windows[1:])


def _plain_pytorch(data_dir: Path, model: GPT, batch: int, steps: int) -> float:
    """fp32, one process, torch using every core: the baseline loop."""
    torch.set_num_threads(os.cpu_count() or 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    batches = ShardStream(data_dir, "train", 0, 1, seed=0).batches(batch)
    times = []
    for _ in range(steps):
        x = next(batches)
        start = time.perf_counter()
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch * (x.shape[1] - 1) / statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = load_config(REPO / "configs" / "shakespeare.yaml", [f"run_dir={tmp / 'two'}", "model.overrides={}"])
        pipeline.run_prepare(base)
        manifest = json.loads((base.data_dir / "manifest.json").read_text())
        model_cfg = base.model.resolve(manifest["vocab_size"], manifest["seq_len"])
        two = _raygpt(tmp / "two", 2, args.steps)
        (tmp / "one").mkdir()
        os.symlink(base.data_dir, tmp / "one" / "data")
        one = _raygpt(tmp / "one", 1, args.steps)
        torch.manual_seed(0)
        baseline = _plain_pytorch(base.data_dir, GPT(model_cfg), 2 * MICRO, max(10, args.steps // 2))
    ray.shutdown()
    fpt = flops_per_token(model_cfg, manifest["seq_len"])
    peak_fp32 = peak_flops("cpu", torch.float32, threads=os.cpu_count())
    peak_bf16_1 = peak_flops("cpu", torch.bfloat16, threads=1)
    print(f"\nmodel: tiny preset, {GPT(model_cfg).num_params() / 1e6:.1f}M parameters; global batch {2 * MICRO} × "
          f"{manifest['seq_len']} tokens")
    print("| run | tokens/s | MFU | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| plain PyTorch, fp32, 1 process × {os.cpu_count()} threads | {baseline:,.0f} | "
          f"{mfu(baseline, fpt, peak_fp32):.1%} | 1.00 |")
    print(f"| raygpt train, 2 workers, bf16, ZeRO-1 | {two:,.0f} | {mfu(two / 2, fpt, peak_bf16_1):.1%} | "
          f"{two / baseline:.2f} |")
    print(f"| raygpt train, 1 worker, bf16, ZeRO-1 | {one:,.0f} | {mfu(one, fpt, peak_bf16_1):.1%} | "
          f"{one / baseline:.2f} |")
    print(f"\n1 → 2 worker scaling efficiency: {two / (2 * one):.2f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
