"""`raygpt plan`'s memory prediction against measurement: gpt2-124m and the `tiny` preset trained for a few steps on 2
CPU workers at ZeRO 0, 1, 2 and 3 (bf16 mixed precision with Adam, as the plan assumes), each rank's peak resident
memory next to the plan's figure for the same config, in one run.

    .venv/bin/python benchmarks/plan_memory.py [--steps 4] [--presets gpt2-124m tiny] [--seq-len 128]

Measured per rank (the larger of the two), from the metrics lines (`rss_start_gib`, `rss_peak_gib`): peak resident
memory − resident memory before the model was built − the runtime's own memory, which is the peak of the same run
with a model of ~no states (`NULL`, per ZeRO stage: torch's and oneDNN's kernels, DeepSpeed, gloo, the data reader;
on a GPU its counterpart is the CUDA context, which the plan counts apart). Plan: model states + buffers as a CPU
holds them (`trainer.plan.buffers(resident=True)`) + one sequence's activations. Target: within ±20%.
Activations per sequence are measured apart, as the difference of the ZeRO-1 peaks at micro-batch 8 and 1, / 7.
On a GPU the figure would be `torch.cuda.max_memory_allocated` (the `gpu_peak_gib` metric). Data: the Python standard
library with a 50,257-token BPE (gpt2-124m's 124M parameters), seq_len 128.

Each configuration is measured twice, on two local Rays (`--malloc`):
- `live`: the workers' glibc malloc serves every block of ≥ 64 KiB with its own mmap (`MALLOC_MMAP_THRESHOLD_`), so a
  freed tensor leaves resident memory at once and the peak RSS is the peak of the bytes alive — the CPU's counterpart
  of `max_memory_allocated`, and what the plan predicts.
- `default`: glibc's own settings, as a user runs. Its threshold rises to the largest block freed (up to 32 MiB), so
  most tensors come from heaps that keep freed memory: RSS is the live bytes plus what the allocator retains (the
  CPU's counterpart of `memory_reserved`), and it creeps up from step to step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import gpt2_data  # noqa: E402
from cluster import pipeline  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.ray_connect import start_local  # noqa: E402
from core.layout import RunLayout  # noqa: E402
from data_pipeline.manifest import read_manifest  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.flops import machine_header  # noqa: E402
from model.hardware import GiB  # noqa: E402
from trainer.plan import activations, count_params, model_states  # noqa: E402

REPO = Path(__file__).resolve().parent.parent



NULL = {"n_layer": 1, "n_head": 1, "n_embd": 16}
"""A model with ~no states (the 50,257-row embedding at width 16: 0.8M parameters), run like the others: its peak is
the runtime's own memory per rank (torch, oneDNN, DeepSpeed, gloo, the data reader), which the plan leaves to the
device (on a GPU the CUDA context) and which is subtracted from every measurement."""
NULL_OVERRIDES = "{" + ", ".join(f"{k}: {v}" for k, v in NULL.items()) + "}"

MALLOC = {"live": {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}, "default": {}}
"""The workers' malloc settings per measurement mode (see the module docstring)."""


def _planned(model: ModelConfig, params: int, largest: int, zero: int, seq_len: int, micro_batch: int) -> float:
    """The plan's peak per rank on 2 CPU workers: model states, buffers as resident on a CPU, activations."""
    states = model_states(params, largest, zero, 2, resident=True)
    return sum(states.values()) + micro_batch * activations(model, seq_len, model.activation_checkpointing)


def _measure(run_dir: Path, data: Path, preset: str, zero: int, steps: int, micro_batch: int = 1,
             overrides: str = "{}") -> dict[str, float]:
    """Bytes per rank (the larger rank): `peak` = resident peak − resident before the model existed; `after` = after
    the last step − before."""
    shutil.copytree(data, RunLayout.of(run_dir).data.root)
    cfg = load_config(REPO / "configs" / "shakespeare.yaml", [
        f"run_dir={run_dir}", f"model.preset={preset}", f"model.overrides={overrides}", f"train.max_steps={steps}",
        "train.log_every=1", f"train.eval_every={10**6}", "train.eval_batches=1", f"train.checkpoint_every={10**6}",
        "train.time_budget_s=null", f"train.micro_batch_size={micro_batch}", "cluster.num_workers=2",
        f"train.global_batch_size={2 * micro_batch}", "train.precision=bf16", f"train.zero_stage={zero}"])
    pipeline.run_train(cfg)
    rows = [json.loads(line) for line in cfg.layout.metrics.read_text().splitlines() if line]
    start, last = rows[0]["rss_start_gib"], rows[-1]
    return {"peak": max(p - s for p, s in zip(last["rss_peak_gib"], start)) * GiB,
            "after": max(a - s for a, s in zip(last["rss_gib"], start)) * GiB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--presets", nargs="+", default=["gpt2-124m", "tiny"])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--big-batch", type=int, default=8, help="micro-batch of the activation runs (ZeRO-1)")
    parser.add_argument("--malloc", nargs="+", choices=list(MALLOC), default=list(MALLOC))
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(machine_header(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = gpt2_data(Path(tmp) / "prepared", args.seq_len)
        for mode in args.malloc:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            os.environ.update(MALLOC[mode])  # before Ray starts: its workers inherit the raylet's environment
            ray.shutdown()  # (the one that prepared the data)
            start_local(2, log_to_driver=False)
            print(f"\n## malloc: {mode}", flush=True)
            _table(args, data, Path(tmp) / mode)
            ray.shutdown()


def _table(args: argparse.Namespace, data: Path, tmp: Path) -> None:
    """Measure every preset and stage on the running Ray and print the tables."""
    rows, acts, peaks = [], [], {}
    vocab = read_manifest(data).vocab_size
    runtime = {}  # per stage: the peak of a model with ~no states (the CPU's counterpart of a CUDA context)
    null = ModelConfig.preset("tiny", vocab_size=vocab, block_size=args.seq_len, **NULL)
    null_params, null_largest = count_params(null)
    for zero in args.stages:
        got = _measure(tmp / f"null-{zero}", data, "tiny", zero, args.steps, overrides=NULL_OVERRIDES)
        runtime[zero] = got["peak"] - _planned(null, null_params, null_largest, zero, args.seq_len, 1)
        print(f"runtime ZeRO-{zero}: {runtime[zero] / GiB:.3f} GiB per rank", flush=True)
    for preset in args.presets:
        model = ModelConfig.preset(preset, vocab_size=vocab, block_size=args.seq_len)
        params, largest = count_params(model)
        for zero in args.stages:
            got = _measure(tmp / f"{preset}-{zero}", data, preset, zero, args.steps)
            want = _planned(model, params, largest, zero, args.seq_len, 1)
            states = sum(model_states(params, largest, zero, 2, resident=True).values())
            measured, peaks[preset, zero] = got["peak"] - runtime[zero], got["peak"]
            rows.append((preset, params, zero, states, want, measured, got["peak"], runtime[zero]))
            print(f"{preset} ({params / 1e6:.1f}M) ZeRO-{zero}: plan {want / GiB:.3f} GiB, measured "
                  f"{measured / GiB:.3f} GiB ({measured / want:.2f}×)", flush=True)
        if (preset, 1) in peaks:
            one = peaks[preset, 1]
            big = _measure(tmp / f"{preset}-1-mb{args.big_batch}", data, preset, 1, args.steps,
                           micro_batch=args.big_batch)["peak"]
            per_sequence = (big - one) / (args.big_batch - 1)
            acts.append((preset, activations(model, args.seq_len, model.activation_checkpointing), per_sequence))
    print("\n| model | ZeRO | plan GiB / rank: states + buffers | + activations | measured peak − runtime | "
          "measured / states + buffers | measured / plan | (peak, runtime) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for preset, params, zero, states, want, got, peak, rt in rows:
        print(f"| {preset} ({params / 1e6:.0f}M) | {zero} | {states / GiB:.3f} | {want / GiB:.3f} | {got / GiB:.3f} | "
              f"**{got / states:.2f}** | **{got / want:.2f}** | ({peak / GiB:.3f}, {rt / GiB:.3f}) |")
    print(f"\n| model | plan: activations GiB per sequence of {args.seq_len} | measured (ZeRO-1, micro-batch "
          f"{args.big_batch} − 1, per sequence) | measured / plan |")
    print("| --- | --- | --- | --- |")
    for preset, want, got in acts:
        print(f"| {preset} | {want / GiB:.4f} | {got / GiB:.4f} | {got / want:.2f} |")


if __name__ == "__main__":
    main()
