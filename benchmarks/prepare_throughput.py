"""Throughput of `raygpt prepare` against raw Hugging Face `tokenizers` `encode_batch`, same text, same run.

    .venv/bin/python benchmarks/prepare_throughput.py [--cpus 2]

Corpus: this interpreter's standard-library .py files (~31 MB here). One tokenizer is trained first and used by both
sides, so both do the same encoding work:
  - baseline: read every file and `encode_batch` them all in one process (tokenizers' own thread pool, every core);
              `encode_batch_fast` (no offsets, what `prepare` calls) is timed the same way and shown too;
  - raygpt:   `prepare` with that tokenizer on a warm local Ray (survey: read, clean, hash; dedup buckets; write:
              read and clean again, tokenize, pack, write shards; manifest), end to end.
The steady-state figure is the marginal rate between a run on half of the files and a run on all of them
(Δ bytes / Δ seconds), which removes the fixed cost of starting each pass's Ray Data tasks. (`benchmarks/prepare_scale.py` measures
100 MB to 1 GB.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.ray_connect import start_local  # noqa: E402
from model.flops import machine_header  # noqa: E402
from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig  # noqa: E402
from data_pipeline.prepare import plan, prepare  # noqa: E402
from data_pipeline.sources import stdlib_files  # noqa: E402
from data_pipeline.tokenizer import train_tokenizer  # noqa: E402


def _link_corpus(files: list[str], folder: Path) -> int:
    """A folder of symlinks to the files (a text source), returning their total size."""
    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        os.symlink(f, folder / f"{i:05d}.py")
    return sum(os.path.getsize(f) for f in files)


def _prepare_seconds(corpus: Path, tokenizer: Path, out: Path, num_cpus: int) -> float:
    cfg = DataConfig(
        sources=[SourceConfig(path=str(corpus), type="text", follow_symlinks=True)],  # a folder of links
        tokenizer=TokenizerConfig(path=str(tokenizer)),
        seq_len=256,
        overwrite=True,
        shard_bytes=8_000_000,
    )
    start = time.perf_counter()
    key, resolved, _ = plan(cfg, out)
    prepare(cfg, out, num_cpus, key, resolved)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    files = stdlib_files()
    texts = [Path(f).read_bytes().decode("utf-8", errors="replace") for f in files]
    total = sum(os.path.getsize(f) for f in files)
    print(machine_header())
    print(f"corpus: {len(files):,} stdlib files, {total / 1e6:.1f} MB; {args.cpus} CPUs")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokenizer_path = tmp / "bench-tokenizer.json"
        train_tokenizer(iter(texts[::4]), TokenizerConfig(vocab_size=8192)).save(str(tokenizer_path))

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        start = time.perf_counter()
        tokenizer.encode_batch(texts, add_special_tokens=False)
        baseline_s = time.perf_counter() - start
        baseline = total / 1e6 / baseline_s
        print(f"baseline encode_batch: {baseline_s:.1f} s, {baseline:.2f} MB/s")
        start = time.perf_counter()
        tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        fast = total / 1e6 / (time.perf_counter() - start)
        print(f"encode_batch_fast: {fast:.2f} MB/s")

        start_local(args.cpus, log_to_driver=False)
        half_bytes = _link_corpus(files[::2], tmp / "half")
        _link_corpus(files, tmp / "full")
        _prepare_seconds(tmp / "half", tokenizer_path, tmp / "warmup", args.cpus)  # warm workers and caches
        half_s = _prepare_seconds(tmp / "half", tokenizer_path, tmp / "out-half", args.cpus)
        full_s = _prepare_seconds(tmp / "full", tokenizer_path, tmp / "out-full", args.cpus)
        ray.shutdown()

    end_to_end = total / 1e6 / full_s
    marginal = (total - half_bytes) / 1e6 / max(full_s - half_s, 1e-9)
    print()
    print("| measure | MB/s | ratio to encode_batch |")
    print("| --- | --- | --- |")
    print(f"| raw `encode_batch` ({args.cpus} threads) | {baseline:.2f} | 1.00 |")
    print(f"| raw `encode_batch_fast` ({args.cpus} threads) | {fast:.2f} | {fast / baseline:.2f} |")
    print(f"| `prepare` end to end, {total / 1e6:.1f} MB, warm Ray ({full_s:.1f} s) | {end_to_end:.2f} | {end_to_end / baseline:.2f} |")
    print(f"| `prepare` steady state (marginal, half → full corpus) | {marginal:.2f} | {marginal / baseline:.2f} |")


if __name__ == "__main__":
    main()
