"""`raygpt prepare` at ~100 MB, ~300 MB and ≥ 1 GB of the same kind of text, in one run: MB/s, peak memory, spill.

    .venv/bin/python benchmarks/prepare_scale.py [--cpus 2] [--sizes 100,300,1050]

Corpus: text files already on the machine (.py, .pyi, .c, .h, .cpp, .hpp, .md, .rst, .txt under the venv, the
interpreter's installation and /usr), in a fixed pseudo-random order; each size is a prefix of that order, linked
into a folder (a text source, one document per file). One 8k BPE tokenizer is trained first and loaded by every run,
so the runs do the same work per byte. Every run uses the same warm local Ray.
Reported per size: input MB/s end to end; the peak of the resident memory summed over this process (the driver) and
all its descendants (every Ray process: GCS, raylet, workers, object store), sampled every 0.2 s; bytes spilled from
Ray's object store. The baseline is raw `encode_batch` (tokenizers' thread pool, every core) on the 100 MB set.
Targets: MB/s at the largest size ≥ 0.9 × at 100 MB; peak memory at the largest ≤ 1.2 × at 100 MB; prepare ≥ 0.8 ×
`encode_batch`.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import itertools
import multiprocessing
import os
import re
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import ray
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.ray_connect import start_local  # noqa: E402
from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig  # noqa: E402
from data_pipeline.prepare import plan, prepare  # noqa: E402
from data_pipeline.tokenizer import train_tokenizer  # noqa: E402
from model.flops import machine_header  # noqa: E402

EXTENSIONS = [".py", ".pyi", ".c", ".h", ".cpp", ".hpp", ".md", ".rst", ".txt"]


def corpus_files(limit: int) -> list[tuple[str, int]]:
    """(path, size) of text files on this machine, in a fixed pseudo-random order, up to `limit` bytes."""
    roots = [sys.prefix, sysconfig.get_paths()["stdlib"], "/usr/lib", "/usr/include", "/usr/share"]
    found: dict[str, int] = {}
    for root in dict.fromkeys(os.path.realpath(r) for r in roots):
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                if os.path.splitext(name)[1] in EXTENSIONS and os.path.isfile(path) and not os.path.islink(path):
                    found.setdefault(os.path.realpath(path), os.path.getsize(path))
    ordered = sorted(found.items(), key=lambda item: hashlib.blake2b(item[0].encode(), digest_size=8).digest())
    chosen, total = [], 0
    for path, size in ordered:
        if total >= limit:
            break
        if 0 < size <= 4_000_000:
            chosen.append((path, size))
            total += size
    return chosen


def link(files: list[tuple[str, int]], folder: Path) -> int:
    folder.mkdir(parents=True)
    for i, (path, _) in enumerate(files):
        os.symlink(path, folder / f"{i:06d}{os.path.splitext(path)[1]}")
    return sum(size for _, size in files)


class PeakMemory:
    """Samples the resident memory of this process and every descendant every 0.2 s; `peak` is the largest sum."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self.parts: dict[str, int] = {}
        self.each: list[tuple[int, str]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total, parts, each = 0, {"driver": 0, "Ray workers": 0, "Ray's own processes": 0}, []
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss, name = p.memory_info().rss, p.name()
                except psutil.Error:
                    continue
                kind = "driver" if p.pid == me.pid else "Ray workers" if name.startswith("ray::") else \
                    "Ray's own processes"
                total += rss
                parts[kind] += rss
                each.append((rss, name))
            if total > self.peak:
                self.peak, self.parts, self.each = total, parts, sorted(each, reverse=True)
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def spilled_mb() -> float:
    """MiB Ray's object store has spilled to disk so far (its memory summary)."""
    from ray._private.internal_api import memory_summary

    found = re.search(r"Spilled (\d+) MiB", memory_summary(stats_only=True))
    return float(found.group(1)) if found else 0.0


def run(corpus: Path, tokenizer: Path, out: Path, cpus: int, minhash: bool) -> tuple[float, int, float, int]:
    cfg = DataConfig(
        sources=[SourceConfig(path=str(corpus), type="text", follow_symlinks=True, extensions=EXTENSIONS)],
        clean={"minhash": {"enabled": minhash}},
        tokenizer=TokenizerConfig(path=str(tokenizer)),
        seq_len=1024,
        overwrite=True,
    )
    spilled = spilled_mb()
    with PeakMemory() as memory:
        start = time.perf_counter()
        key, resolved, _ = plan(cfg, out)
        manifest = prepare(cfg, out, cpus, key, resolved)
        seconds = time.perf_counter() - start
    kept = sum(manifest.splits[s].text_bytes for s in manifest.splits)
    print("  at the peak: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in memory.parts.items()) + "; largest: "
          + ", ".join(f"{name} {rss / 1e9:.2f}" for rss, name in memory.each[:5]), flush=True)
    return seconds, memory.peak, spilled_mb() - spilled, kept


def tokenizer_and_baseline(paths: list[str], tokenizer_path: str) -> float:
    """In a process of its own (so that the driver's memory stays that of a driver): train the 8k tokenizer on every
    5th file of the set and time raw `encode_batch` on the whole set → MB/s."""
    texts = [Path(p).read_bytes().decode("utf-8", errors="replace") for p in paths]
    train_tokenizer(iter(texts[::5]), TokenizerConfig(vocab_size=8192)).save(tokenizer_path)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    start = time.perf_counter()
    for i in range(0, len(texts), 2000):  # in chunks: the encodings of 100 MB at once would take GBs
        tokenizer.encode_batch(texts[i:i + 2000], add_special_tokens=False)
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--sizes", default="100,300,1050", help="MB of each run, smallest first")
    parser.add_argument("--minhash", action="store_true", help="near-dedup (MinHash) on as well")
    args = parser.parse_args()
    sizes = [int(s) * 1_000_000 for s in args.sizes.split(",")]
    files = corpus_files(max(sizes))
    print(machine_header())
    print(f"corpus: {len(files):,} files, {sum(s for _, s in files) / 1e6:,.0f} MB; {args.cpus} CPUs; "
          f"MinHash {'on' if args.minhash else 'off'}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("RAYGPT_BENCH_TMP")) as tmp_name:
        tmp = Path(tmp_name)
        ends = list(itertools.accumulate(s for _, s in files))
        sets = [files[: bisect.bisect_left(ends, size) + 1] for size in sizes]
        tokenizer_path = tmp / "bench-tokenizer.json"
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # its memory goes with it
            baseline = pool.submit(tokenizer_and_baseline, [p for p, _ in sets[0]], str(tokenizer_path)).result()
        print(f"baseline encode_batch on the {sum(s for _, s in sets[0]) / 1e6:.0f} MB set: {baseline:.2f} MB/s")

        start_local(args.cpus, log_to_driver=False)
        rows = []
        for chosen in sets:
            nbytes = link(chosen, tmp / f"corpus-{len(rows)}")
            seconds, peak, spilled, kept = run(tmp / f"corpus-{len(rows)}", tokenizer_path, tmp / f"out-{len(rows)}",
                                               args.cpus, args.minhash)
            rows.append((nbytes, seconds, peak, spilled, kept))
            print(f"{nbytes / 1e6:,.0f} MB: {seconds:.1f} s, {nbytes / 1e6 / seconds:.2f} MB/s, peak memory "
                  f"{peak / 1e9:.2f} GB, spilled {spilled:.0f} MiB, kept {kept / nbytes:.1%}", flush=True)
        ray.shutdown()

    small, large = rows[0], rows[-1]
    base_bytes = sum(s for _, s in sets[0])
    rate = [n / 1e6 / s for n, s, *_ in rows]
    print()
    print("| input | kept (dedup) | seconds | MB/s | ratio to 100 MB | kept MB/s | ratio to `encode_batch` | "
          "peak memory (GB) | ratio to 100 MB | spilled |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (n, s, peak, spilled, kept), r in zip(rows, rate):
        print(f"| {n / 1e6:,.0f} MB | {kept / n:.1%} | {s:.1f} | {r:.2f} | {r / rate[0]:.2f} | {kept / 1e6 / s:.2f} | "
              f"{r / baseline:.2f} | {peak / 1e9:.2f} | {peak / small[2]:.2f} | {spilled:.0f} MiB |")
    print(f"| raw `encode_batch`, {base_bytes / 1e6:,.0f} MB ({args.cpus} threads) | | | {baseline:.2f} | | | 1.00 | | | |")
    print()
    print(f"targets: MB/s at {large[0] / 1e6:,.0f} MB / 100 MB = {rate[-1] / rate[0]:.2f} (≥ 0.9); peak memory "
          f"{large[2] / small[2]:.2f}× (≤ 1.2); prepare / encode_batch = {rate[-1] / baseline:.2f} (≥ 0.8)")


if __name__ == "__main__":
    main()
