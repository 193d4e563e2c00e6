"""What checkpoints cost training: tokens/s of `raygpt train` (gpt2-124m, 2 workers) with no checkpoints, with
asynchronous checkpoints every 10 steps (`train.checkpoint_async`, the default) and with synchronous ones (the
contrast), at ZeRO-1 and ZeRO-3, with run_dir on the local disk and on an S3 bucket — all in one run. Then a resume
of the last checkpoint at the same world size and stage: the bytes each rank read against the state's total.
Goal: async ≥ 0.95× none; each rank reads ≤ 1/W + 10% of the state.

    .venv/bin/python benchmarks/checkpoint_stall.py [--steps 31] [--stages 1 3] [--seq-len 128]

tokens/s is over steps 2..N from the metrics' elapsed_s (the first step includes start-up), so the checkpoints of
steps 10, 20 and 30 are inside the window and the last one (after the last metrics line) is not, in every mode.
The bucket is moto's S3 server in this process: its CPU time to take an upload is charged to this 2-core machine,
which a real object store does not do. Data: the Python standard library source with a 50,257-token BPE (so the
model has gpt2-124m's 124M parameters), seq_len 128, micro-batch 1 per worker, precision auto.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import gpt2_data, moto_bucket  # noqa: E402
from cluster import pipeline  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.ray_connect import start_local  # noqa: E402
from core.layout import RunLayout  # noqa: E402
from core import files  # noqa: E402
from data_pipeline.manifest import read_manifest  # noqa: E402
from model.flops import machine_header  # noqa: E402
from model.gpt import ModelConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent




def _train(run_dir: str, data: Path, stage: int, steps: int, mode: str) -> dict[str, float]:
    """tokens/s over steps 2..N, and the seconds training spent in checkpoint saves."""
    if "://" in run_dir:
        files.upload_folder(data, f"{run_dir}/data")
    else:
        shutil.copytree(data, RunLayout.of(run_dir).data.root)
    every = 10 if mode != "none" else 10**6
    cfg = load_config(REPO / "configs" / "shakespeare.yaml", [
        f"run_dir={run_dir}", "model.preset=gpt2-124m", "model.overrides={}", f"train.max_steps={steps}",
        "train.log_every=1", f"train.eval_every={10**6}", "train.eval_batches=1", f"train.checkpoint_every={every}",
        f"train.checkpoint_async={mode != 'sync'}", "train.time_budget_s=null", "train.micro_batch_size=1",
        "cluster.num_workers=2", "train.precision=auto", f"train.zero_stage={stage}", "train.warmup_steps=5"])
    cpu = psutil.Process().cpu_times()
    pipeline.run_train(cfg)
    after = psutil.Process().cpu_times()
    rows = [json.loads(line) for line in files.read_text(cfg.layout.metrics).splitlines() if line]
    tokens = (rows[-1]["tokens"] - rows[0]["tokens"])
    durations = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]
    print(f"  {mode} step seconds (steps 2..{steps}): " + " ".join(f"{d:.1f}" for d in durations), flush=True)
    return {"tokens_per_s": tokens / (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]),
            "blocked_s": sum(r.get("checkpoint_s", 0.0) for r in rows), "precision": rows[-1]["precision"],
            # this process: the driver, which mostly waits, and moto's server threads, which take every upload
            "driver_cpu_s": after.user + after.system - cpu.user - cpu.system}


def _resume(run_dir: str, steps: int, stage: int) -> dict[str, float]:
    """One more step from the newest checkpoint: the bytes each rank read (the first metrics line after a resume)."""
    cfg = load_config(REPO / "configs" / "shakespeare.yaml", [
        f"run_dir={run_dir}", "model.preset=gpt2-124m", "model.overrides={}", f"train.max_steps={steps + 1}",
        "train.log_every=1", f"train.eval_every={10**6}", "train.eval_batches=1", "train.checkpoint_every=10",
        "train.time_budget_s=null", "train.micro_batch_size=1", "cluster.num_workers=2", "train.precision=auto",
        f"train.zero_stage={stage}", "train.warmup_steps=5"])
    pipeline.run_train(cfg)
    rows = [json.loads(line) for line in files.read_text(cfg.layout.metrics).splitlines() if line]
    line = next(r for r in rows if "resume_read_bytes" in r)
    return {"read": max(line["resume_read_bytes"]), "total": line["resume_state_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=31)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--where", nargs="+", default=["local", "bucket"])
    parser.add_argument("--modes", nargs="+", default=["async", "sync"])
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    server = moto_bucket("bench")
    print(machine_header(), flush=True)
    start_local(2, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = gpt2_data(Path(tmp) / "prepared", args.seq_len)
        vocab = read_manifest(data).vocab_size
        params = sum(p.numel() for p in __import__("model.gpt", fromlist=["GPT"]).GPT(
            ModelConfig.preset("gpt2-124m", vocab_size=vocab, block_size=args.seq_len)).parameters())
        print(f"gpt2-124m with vocab {vocab:,}: {params / 1e6:.1f}M parameters; state {params * 12 / 1e9:.2f} GB "
              "(fp32 weights + Adam's 2 moments)", flush=True)
        for stage in args.stages:
            base = _train(f"{tmp}/none-{stage}", data, stage, args.steps, "none")
            print(f"ZeRO-{stage} none: {base['tokens_per_s']:.1f} tokens/s ({base['precision']})", flush=True)
            for where in args.where:
                for mode in args.modes:
                    run_dir = f"{tmp}/{mode}-{stage}" if where == "local" else f"s3://bench/{mode}-{stage}"
                    got = _train(run_dir, data, stage, args.steps, mode)
                    ratio = got["tokens_per_s"] / base["tokens_per_s"]
                    rows.append((stage, where, mode, got["tokens_per_s"], ratio, got["blocked_s"], got["driver_cpu_s"]))
                    print(f"ZeRO-{stage} {where:6} {mode:5}: {got['tokens_per_s']:.1f} tokens/s = {ratio:.3f}× none; "
                          f"training waited {got['blocked_s']:.1f} s in saves; CPU of this process (driver + moto) "
                          f"{got['driver_cpu_s']:.0f} s", flush=True)
        if "local" in args.where and "async" in args.modes:
            stage = args.stages[0]
            read = _resume(f"{tmp}/async-{stage}", args.steps, stage)
            print(f"resume at the same world size (2) and ZeRO-{stage}: each rank read ≤ {read['read'] / 1e6:,.0f} MB of "
                  f"{read['total'] / 1e6:,.0f} MB = {read['read'] / read['total']:.3f} (goal ≤ 0.60)", flush=True)
    server.stop()
    print("\n| ZeRO | run_dir | checkpoints | tokens/s | vs none | training waited (s) | CPU s of driver + moto |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for stage, where, mode, tps, ratio, blocked, cpu in rows:
        print(f"| {stage} | {where} | {mode} every 10 steps | {tps:.1f} | {ratio:.3f} | {blocked:.1f} | {cpu:.0f} |")


if __name__ == "__main__":
    main()
