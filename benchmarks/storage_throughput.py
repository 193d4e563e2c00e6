"""Object storage against a local disk, in one run: `raygpt prepare` MB/s writing to a local run_dir and to a bucket
run_dir, and `raygpt train` tokens/s (2 workers) reading its shards from the local disk and streaming them from the
bucket. Goal: streaming does not slow training (bucket / local ≥ 0.95).

    .venv/bin/python benchmarks/storage_throughput.py [--steps 40] [--rounds 2]

The bucket is a real S3-protocol server on 127.0.0.1 (moto's standalone server, a dev dependency), so this measures
raygpt's object-storage path — pyarrow's S3 client, streaming, read-ahead, hashing, uploads of checkpoints and
metrics — not a cloud network. Local and bucket runs alternate for `--rounds` rounds (the machine is noisy); each
figure is the median. prepare: the Python standard library source (~30 MB) with a fixed 8k tokenizer, after one
warm-up run; train: tinyshakespeare (vocab 2048, seq_len 256), the `tiny` preset, fp32, 2 workers.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import moto_bucket  # noqa: E402
from cluster import pipeline  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.ray_connect import start_local  # noqa: E402
from core import files
from core.layout import RunLayout  # noqa: E402
from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig  # noqa: E402
from data_pipeline.prepare import plan, prepare  # noqa: E402
from data_pipeline.sources import stdlib_files  # noqa: E402
from data_pipeline.tokenizer import train_tokenizer  # noqa: E402
from model.flops import machine_header  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = ["data.tokenizer.vocab_size=2048", "data.seq_len=256", "data.shard_bytes=200000"]



def _config(run_dir: str, steps: int) -> list[str]:
    return [f"run_dir={run_dir}", *DATA, "model.overrides={}", f"train.max_steps={steps}", "train.log_every=5",
            f"train.eval_every={steps}", "train.eval_batches=1", f"train.checkpoint_every={steps}",
            "train.time_budget_s=null", "train.micro_batch_size=8", "cluster.num_workers=2", "train.precision=fp32"]


def _prepare(run_dir: str, tokenizer: Path) -> float:
    """Seconds of the prepare stage (the stdlib corpus, a fixed tokenizer) into RUN_DIR/data."""
    cfg = DataConfig(sources=[SourceConfig(type="python-stdlib")], tokenizer=TokenizerConfig(path=str(tokenizer)),
                     seq_len=256, overwrite=True, shard_bytes=8_000_000)
    data_dir = RunLayout.of(run_dir).data.root
    started = time.perf_counter()
    key, resolved, _ = plan(cfg, data_dir)
    prepare(cfg, data_dir, 2, key, resolved)
    return time.perf_counter() - started


def _train(run_dir: str, steps: int) -> float:
    """Median tokens/s of the logged windows after the first (which includes start-up)."""
    cfg = load_config(REPO / "configs" / "shakespeare.yaml", _config(run_dir, steps))
    pipeline.run_prepare(cfg)
    pipeline.run_train(cfg)
    rows = [json.loads(line) for line in files.read_text(cfg.layout.metrics).splitlines() if line]
    return statistics.median(r["tokens_per_sec"] for r in rows[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    server = moto_bucket("bench")
    print(machine_header())
    start_local(2, log_to_driver=False)
    files = stdlib_files()
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    tokens: dict[str, list[float]] = {"local": [], "bucket": []}
    prep: dict[str, list[float]] = {"local": [], "bucket": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "bench-tokenizer.json"
        texts = (Path(f).read_bytes().decode("utf-8", errors="replace") for f in files[::4])
        train_tokenizer(texts, TokenizerConfig(vocab_size=8192)).save(str(tokenizer))
        _prepare(f"{tmp}/warm-up", tokenizer)
        for r in range(args.rounds):
            for where in ("local", "bucket"):
                run_dir = f"{tmp}/run-{r}" if where == "local" else f"s3://bench/run-{r}"
                prep[where].append(mb / _prepare(f"{run_dir}-prepare", tokenizer))
                tokens[where].append(_train(run_dir, args.steps))
                print(f"round {r + 1} {where:6}: prepare {prep[where][-1]:.2f} MB/s, train {tokens[where][-1]:,.0f} "
                      "tokens/s", flush=True)
    server.stop()
    local, bucket = statistics.median(tokens["local"]), statistics.median(tokens["bucket"])
    p_local, p_bucket = statistics.median(prep["local"]), statistics.median(prep["bucket"])
    print(f"train, 2 workers: local {local:,.0f} tokens/s, bucket {bucket:,.0f} tokens/s: bucket / local = "
          f"{bucket / local:.2f} (goal ≥ 0.95)")
    print(f"prepare ({mb:.1f} MB corpus): local {p_local:.2f} MB/s, bucket {p_bucket:.2f} MB/s: bucket / local = "
          f"{p_bucket / p_local:.2f}")


if __name__ == "__main__":
    main()
