"""What a resize and a preemption cost. `raygpt train` legs 2 workers → 1 → 2 (each resumes the previous one's newest
committed checkpoint at the new world size) against the same legs at a constant 2 workers, in the same run: per leg,
the seconds from the command's start to its first training step (driver checks, Ray Train, DeepSpeed, checkpoint
verification and the resharding load) and the steps redone, and the ratio resized / constant. Then a preemption: a
worker dies 3 steps after a commit (Ray Train restarts the group): seconds from its last step to the first step
after the restart, the steps redone, and the seconds until training is back where it was.

    .venv/bin/python benchmarks/elastic_resize.py [--steps 20] [--rounds 2]

tinyshakespeare (vocab 2048, seq_len 256), the `tiny` preset, fp32, global batch 16 (micro 8: 2 workers × 1 or
1 × 2 micro-batches), `cluster.cpus_per_worker=1`; times come from the `wall_time` of the metrics lines (rank 0,
every step). Medians over `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster import pipeline  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.ray_connect import start_local  # noqa: E402
from core.layout import RunLayout  # noqa: E402
from model.flops import machine_header  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = ["data.tokenizer.vocab_size=2048", "data.seq_len=256", "data.shard_bytes=200000"]


def _config(run_dir: Path, steps: int, workers: int, every: int) -> Any:
    return load_config(REPO / "configs" / "shakespeare.yaml", [
        f"run_dir={run_dir}", *DATA, "model.overrides={}", f"train.max_steps={steps}", "train.log_every=1",
        "train.eval_every=100000", "train.eval_batches=1", f"train.checkpoint_every={every}", "train.time_budget_s=null",
        "train.micro_batch_size=8", "train.global_batch_size=16", "train.lr=1e-3", "train.min_lr=1e-3",
        "train.warmup_steps=0",  # a constant lr: every leg raises max_steps
        f"cluster.num_workers={workers}", "cluster.cpus_per_worker=1", "train.precision=fp32", "cluster.max_failures=1"])


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = RunLayout.of(run_dir).metrics
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _leg(run_dir: Path, steps: int, workers: int) -> dict[str, float]:
    """One `raygpt train` leg to `steps` → seconds from its start to its first step, and steps redone."""
    done = max((r["step"] for r in _rows(run_dir)), default=0)
    cfg = _config(run_dir, steps, workers, every=steps)
    started = time.time()
    pipeline.run_train(cfg)
    new = [r for r in _rows(run_dir) if r["step"] > done]
    step_s = statistics.median(b["wall_time"] - a["wall_time"] for a, b in zip(new, new[1:]))
    resumed_from = new[0]["step"] - 1
    return {"startup_s": new[0]["wall_time"] - step_s - started, "redone": float(done - resumed_from)}


class _Watcher:
    """Polls metrics.jsonl while a leg runs: every (step, wall_time) rank 0 wrote, even lines a resume later drops."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.seen, self.stop = run_dir, {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.is_set():
            for row in _rows(self.run_dir):
                self.seen.setdefault((row["step"], row["wall_time"]), row)
            self.stop.wait(0.05)

    def __enter__(self) -> _Watcher:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        for row in _rows(self.run_dir):
            self.seen.setdefault((row["step"], row["wall_time"]), row)


def _preemption(run_dir: Path, steps: int, every: int, die_after: int) -> dict[str, float]:
    """2 workers; the last dies after step `die_after`; Ray Train restarts the group from the newest commit."""
    os.environ["RAYGPT_TEST_FAULTS"] = json.dumps({"exit_after_step": die_after})
    try:
        with _Watcher(run_dir) as watch:
            pipeline.run_train(_config(run_dir, steps, 2, every))
    finally:
        os.environ.pop("RAYGPT_TEST_FAULTS", None)
    lines = sorted((t, s) for s, t in watch.seen)  # (wall_time, step) of every attempt's lines
    restart = next(i for i in range(1, len(lines)) if lines[i][1] <= lines[i - 1][1])  # the step count went back
    death, last = lines[restart - 1]
    first_after, resumed = lines[restart]
    back = min(t for t, s in lines[restart:] if s == last)
    # the dying step itself (die_after) is trained but never logged: its metrics line waits on the dead rank
    return {"restart_s": first_after - death, "redone": float(die_after - (resumed - 1)), "lost_s": back - death,
            "last_logged": float(last)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per leg")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--preemption-only", action="store_true", help="skip the resize legs")
    args = parser.parse_args()
    start_local(2, log_to_driver=False)
    print(machine_header())
    n = args.steps
    results: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            for name, sizes in (() if args.preemption_only else (("resized", (2, 1, 2)), ("constant", (2, 2, 2)))):
                run_dir = Path(tmp) / name
                pipeline.run_prepare(_config(run_dir, n, 2, n))
                for leg, workers in enumerate(sizes):
                    results.setdefault(f"{name} leg {leg + 1} ({workers} worker{'s' * (workers > 1)})", []).append(
                        _leg(run_dir, n * (leg + 1), workers))
            run_dir = Path(tmp) / "preempted"
            pipeline.run_prepare(_config(run_dir, n, 2, n))
            results.setdefault("preemption", []).append(_preemption(run_dir, 2 * n, every=n // 2, die_after=n // 2 + 3))
    print(f"\n{'leg':36s} {'start → first step':>20s} {'steps redone':>13s}")
    for name, rows in results.items():
        if name == "preemption":
            continue
        print(f"{name:36s} {statistics.median(r['startup_s'] for r in rows):19.1f}s "
              f"{statistics.median(r['redone'] for r in rows):13.0f}")
    for leg, workers in (() if args.preemption_only else ((2, 1), (3, 2))):
        resized = statistics.median(r["startup_s"] for r in results[f"resized leg {leg} ({workers} worker{'s' * (workers > 1)})"])
        constant = statistics.median(r["startup_s"] for r in results[f"constant leg {leg} (2 workers)"])
        print(f"resize to {workers}: start-up resized / constant = {resized / constant:.2f}")
    p = results["preemption"]
    print(f"preemption (a worker dies after step {n // 2 + 3}, 3 steps after a commit): restart "
          f"{statistics.median(r['restart_s'] for r in p):.1f}s from its last logged step "
          f"({statistics.median(r['last_logged'] for r in p):.0f}) to the first step after the restart, "
          f"{statistics.median(r['redone'] for r in p):.0f} steps redone, back at step "
          f"{statistics.median(r['last_logged'] for r in p):.0f} after {statistics.median(r['lost_s'] for r in p):.1f}s")


if __name__ == "__main__":
    main()
