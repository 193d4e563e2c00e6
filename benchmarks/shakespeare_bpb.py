"""`configs/shakespeare.yaml` end to end (prepare + train) under its fixed 5-minute training budget on this machine;
reports val bits-per-byte and writes the loss curve to docs/shakespeare_loss.png.

    .venv/bin/python benchmarks/shakespeare_bpb.py

Reference on this machine: nanoGPT's char-level CPU "baby GPT" on tinyshakespeare reached 2.72 bits per byte.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster import pipeline  # noqa: E402
from cluster.ray_connect import start_local  # noqa: E402
from cluster.config import load_config  # noqa: E402
from model.flops import machine_header  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NANOGPT_BPB = 2.72


def plot(metrics: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["elapsed_s"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["elapsed_s"], m["val_loss"]) for m in metrics if "val_loss" in m and "elapsed_s" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("training seconds (2 CPU cores)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("raygpt on tinyshakespeare: configs/shakespeare.yaml")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    print(machine_header())
    start_local(os.cpu_count(), log_to_driver=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "shakespeare.yaml", [f"run_dir={tmp}/run"])
        pipeline.run_prepare(cfg)
        start = time.perf_counter()
        pipeline.run_train(cfg)
        wall = time.perf_counter() - start
        metrics = [json.loads(line) for line in cfg.layout.metrics.read_text().splitlines()]
    ray.shutdown()
    plot(metrics, REPO / "docs" / "shakespeare_loss.png")
    last = [m for m in metrics if "val_bpb" in m][-1]
    print(f"\nsteps {last['step']}, training time {last['elapsed_s']:.0f} s (wall with start-up {wall:.0f} s)")
    print(f"val loss {last['val_loss']:.3f} nats/token, val bits per byte {last['val_bpb']:.3f} "
          f"(target ≤ 2.45; nanoGPT char-level CPU recipe here: {NANOGPT_BPB})")


if __name__ == "__main__":
    main()
