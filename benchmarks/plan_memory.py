"""`raygpt plan`'s memory prediction against measurement: gpt2-124m and the `tiny` preset trained for a few steps on 2
CPU workers at ZeRO 0, 1, 2 and 3 (bf16 mixed precision with Adam, as the plan assumes), each rank's resident memory
next to the plan's figure for the same config, in one run.

    .venv/bin/python benchmarks/plan_memory.py [--steps 4] [--presets gpt2-124m tiny] [--seq-len 128]

Measured per rank (the larger of the two), from the metrics lines (`rss_start_gib`, `rss_gib`, `rss_peak_gib`):
- model states = resident memory after the last step − before the model was built (the interpreter, torch, Ray and
  DeepSpeed): parameters, gradients and optimizer states, plus what the allocator keeps of freed activations;
- activations = peak − after the last step (what a step holds beyond the states; the allocator's leftovers make it
  an underestimate).
On a GPU the figure would be `torch.cuda.max_memory_allocated` (the `gpu_peak_gib` metric). Target: states within ±20%
of the plan. Data: the Python standard library with a 50,257-token BPE (gpt2-124m's 124M parameters), seq_len 128,
micro-batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

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



def _measure(run_dir: Path, data: Path, preset: str, zero: int, steps: int) -> dict[str, float]:
    shutil.copytree(data, RunLayout.of(run_dir).data.root)
    cfg = load_config(REPO / "configs" / "shakespeare.yaml", [
        f"run_dir={run_dir}", f"model.preset={preset}", "model.overrides={}", f"train.max_steps={steps}",
        "train.log_every=1", f"train.eval_every={10**6}", "train.eval_batches=1", f"train.checkpoint_every={10**6}",
        "train.time_budget_s=null", "train.micro_batch_size=1", "cluster.num_workers=2", "train.precision=bf16",
        f"train.zero_stage={zero}"])
    pipeline.run_train(cfg)
    rows = [json.loads(line) for line in cfg.layout.metrics.read_text().splitlines() if line]
    start, last = rows[0]["rss_start_gib"], rows[-1]
    states = max(now - before for now, before in zip(last["rss_gib"], start))
    acts = max(peak - now for now, peak in zip(last["rss_gib"], last["rss_peak_gib"]))
    return {"states": states * GiB, "activations": acts * GiB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--presets", nargs="+", default=["gpt2-124m", "tiny"])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(machine_header(), flush=True)
    start_local(2, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = gpt2_data(Path(tmp) / "prepared", args.seq_len)
        vocab = read_manifest(data).vocab_size
        for preset in args.presets:
            model = ModelConfig.preset(preset, vocab_size=vocab, block_size=args.seq_len)
            params, largest = count_params(model)
            act = activations(model, args.seq_len, model.activation_checkpointing)
            for zero in args.stages:
                got = _measure(Path(tmp) / f"{preset}-{zero}", data, preset, zero, args.steps)
                want = sum(model_states(params, largest, zero, 2).values())
                rows.append((preset, params, zero, want, got["states"], act, got["activations"]))
                print(f"{preset} ({params / 1e6:.1f}M) ZeRO-{zero}: states plan {want / GiB:.3f} GiB, measured "
                      f"{got['states'] / GiB:.3f} GiB ({got['states'] / want:.2f}×); activations plan {act / GiB:.3f}, "
                      f"measured {got['activations'] / GiB:.3f} GiB", flush=True)
    print("\n| model | ZeRO | plan: states GiB / rank | measured | measured / plan | plan: activations GiB | measured |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for preset, params, zero, want, got, act, got_act in rows:
        print(f"| {preset} ({params / 1e6:.0f}M) | {zero} | {want / GiB:.3f} | {got / GiB:.3f} | {got / want:.2f} | "
              f"{act / GiB:.3f} | {got_act / GiB:.3f} |")


if __name__ == "__main__":
    main()
