"""Training on the GPUs of this machine through `raygpt train`: gpt2-124m (and llama-1b when `raygpt plan` says it
fits) in bf16 with ZeRO-1 and ZeRO-3, one Ray Train worker per GPU. Prints tokens/s, MFU against the GPU's dense bf16
peak (model/hardware.py) and rank 0's peak memory, next to what `raygpt plan` estimated for the same run.

    .venv/bin/python benchmarks/gpu_train.py [--steps 30] [--micro-batch 16] [--models gpt2-124m,llama-1b]

Data: this interpreter's standard library (offline, the demo corpus) prepared once with a 50,304-token tokenizer and
1,024-token blocks into a temp folder. On a machine without a CUDA GPU it exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--models", default="gpt2-124m,llama-1b")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu_train.py: no CUDA GPU on this machine; nothing measured", file=sys.stderr)
        sys.exit(2)

    from cluster import pipeline
    from cluster.config import load_config
    from cluster.ray_connect import start_local
    from core.layout import RunLayout
    from model.hardware import GPUS, gpu_named
    from trainer.plan import activations, count_params, model_of, model_states

    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name()
    card = gpu_named(name) or GPUS["h100"]
    start_local()
    print(f"GPU: {gpus} × {name} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB); "
          f"torch {torch.__version__}; {args.steps} steps, micro-batch {args.micro_batch} per GPU, context 1024")
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"run_dir={tmp}/prepared", "data.tokenizer.vocab_size=50304", "data.seq_len=1024",
                "data.tokenizer.sample_bytes=20000000", "data.shard_bytes=50000000"]
        prepared = load_config(REPO / "configs" / "demo.yaml", base)
        pipeline.run_prepare(prepared)
        print("| model | ZeRO | tokens/s | MFU | peak memory GiB (rank 0) | plan: states + activations GiB |")
        print("| --- | --- | --- | --- | --- | --- |")
        for preset in args.models.split(","):
            for zero in (1, 3):
                run_dir = Path(tmp) / f"{preset}-zero{zero}"
                run_dir.mkdir()
                Path(RunLayout.of(run_dir).data.root).symlink_to(prepared.layout.data.root)  # prepared once
                cfg = load_config(REPO / "configs" / "demo.yaml", [
                    f"run_dir={run_dir}", *base[1:], f"model.preset={preset}", f"train.max_steps={args.steps}",
                    f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.micro_batch * gpus}",
                    f"train.zero_stage={zero}", "train.precision=bf16", "train.log_every=5",
                    f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}", "cluster.use_gpu=true",
                    f"cluster.num_workers={gpus}", "cluster.cpus_per_worker=1", "eval.tasks=[]"])
                model = model_of(cfg)
                params, largest = count_params(model)
                planned = (sum(model_states(params, largest, zero, gpus).values())
                           + args.micro_batch * activations(model, 1024, model.activation_checkpointing))
                if planned > card.memory * 0.9:
                    print(f"| {preset} | {zero} | skipped: `raygpt plan` estimates {planned / 2**30:.1f} GiB per GPU | | | |")
                    continue
                pipeline.run_train(cfg)
                rows = [json.loads(line) for line in cfg.layout.metrics.read_text().splitlines() if '"mfu"' in line]
                steady = rows[1:] or rows
                tps = statistics.median(r["tokens_per_sec"] for r in steady)
                mfu = statistics.median(r["mfu"] for r in steady if r["mfu"] is not None)
                memory = max(r.get("gpu_peak_gib", 0.0) for r in rows)
                print(f"| {preset} | {zero} | {tps:,.0f} | {mfu:.1%} | {memory:.1f} | {planned / 2**30:.1f} |")


if __name__ == "__main__":
    main()
