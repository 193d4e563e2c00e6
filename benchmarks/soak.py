"""A long training run under the faults of a spot cluster, watched for leaks: the `tiny` preset (gpt2-124m's smaller
cousin) on a 2-node local Ray cluster, run_dir on an S3 bucket, asynchronous checkpoints every ~2 minutes, one
worker SIGKILLed and one node drained on the way. Not part of `make test`.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--every-s 120]

Reports, from a monitor sampling every 15 s: tokens/s per tenth of the run, the steps redone (after the SIGKILL: the
steps since the last commit; after the drain: none), the bucket's bytes and the local cache's size, and the resident
memory of every process of the run — the driver (this process), each training worker, the raylets and the GCS —
from its first sample after the first checkpoint to its last. Goal: no process grows by more than 10%.

The bucket is moto's S3 server in a separate process (its memory holds the bucket and is not the run's). The kill
comes at 1/3 of the run, the drain at 2/3; the drained node is then removed and a fresh one added, as a cloud would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "configs" / "shakespeare.yaml"


def _processes() -> dict[str, psutil.Process]:
    """The run's processes by role: this driver, the training workers, raylets and the GCS."""
    found = {"driver": psutil.Process()}
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if "RayTrainWorker" in line or proc.info["name"] == "ray::RayTrainWorker":
            found[f"worker pid {proc.pid}"] = proc
        elif "raylet" in (proc.info["name"] or ""):
            found[f"raylet pid {proc.pid}"] = proc
        elif "gcs_server" in (proc.info["name"] or ""):
            found[f"gcs pid {proc.pid}"] = proc
    return found


class Monitor:
    """Samples every process's RSS and the run's logged steps every `period` seconds on a thread."""

    def __init__(self, metrics_at: str, period: float = 15.0):
        from core import files

        self.files, self.metrics_at, self.period = files, metrics_at, period
        self.rss: dict[str, list[tuple[float, float]]] = {}
        self.steps: list[tuple[float, int]] = []
        self.first_checkpoint: float | None = None
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(self.period):
            now = time.monotonic() - self.started
            for role, proc in _processes().items():
                try:
                    self.rss.setdefault(role, []).append((now, proc.memory_info().rss / 2**30))
                except psutil.Error:
                    continue
            try:
                rows = [json.loads(line) for line in self.files.read_text(self.metrics_at).splitlines() if line]
            except (OSError, ValueError):
                rows = []
            if rows:
                self.steps.append((now, rows[-1]["step"]))
                if self.first_checkpoint is None and any("checkpoint_s" in r for r in rows):
                    self.first_checkpoint = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--every-s", type=float, default=120)
    args = parser.parse_args()
    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="soak", AWS_SECRET_ACCESS_KEY="soak",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", DS_ACCELERATOR="cpu",
                      RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="1")
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import boto3
    import ray
    from ray.cluster_utils import Cluster

    from cluster import pipeline
    from cluster.config import load_config
    from core import files
    from core.layout import RunLayout
    from model.flops import machine_header

    deadline = time.monotonic() + 30
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket="soak")
            break
        except Exception:
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.5)
    print(machine_header(), flush=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    run_dir = "s3://soak/run"
    cache = Path(tempfile.mkdtemp(prefix="raygpt-soak-cache-"))
    os.environ["RAYGPT_CACHE"] = str(cache)
    seconds = args.minutes * 60
    overrides = [f"run_dir={run_dir}", "model.preset=tiny", "model.overrides={}", "train.max_steps=10000000",
                 f"train.time_budget_s={seconds}", f"train.checkpoint_every_s={args.every_s}",
                 "train.checkpoint_every=10000000", "train.eval_every=500", "train.log_every=20",
                 "train.micro_batch_size=8", "cluster.num_workers=2", "cluster.cpus_per_worker=1",
                 "cluster.placement_strategy=SPREAD", "cluster.max_failures=2"]
    cfg = load_config(SHAKESPEARE, overrides)
    pipeline.run_prepare(cfg)
    layout = RunLayout.of(run_dir)
    monitor = Monitor(str(layout.metrics))
    events: list[str] = []

    def inject() -> None:  # the SIGKILL at 1/3, the drain at 2/3
        time.sleep(seconds / 3)
        victim = next((p for role, p in _processes().items() if role.startswith("worker")), None)
        if victim is not None:
            events.append(f"{time.monotonic() - monitor.started:.0f}s: SIGKILL worker pid {victim.pid}")
            victim.send_signal(signal.SIGKILL)
        time.sleep(seconds / 3)
        node = next(iter(cluster.worker_nodes))
        events.append(f"{time.monotonic() - monitor.started:.0f}s: drain node {node.node_id[:8]}")
        subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address,
                        "--node-id", node.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                        "soak", "--deadline-remaining-seconds", "120"], check=True, capture_output=True)
        time.sleep(60)
        cluster.remove_node(node, allow_graceful=False)
        cluster.add_node(num_cpus=2)
        events.append(f"{time.monotonic() - monitor.started:.0f}s: drained node removed, a fresh one added")

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    pipeline.run_train(cfg)
    monitor.stop.set()
    monitor.thread.join()
    rows = [json.loads(line) for line in files.read_text(layout.metrics).splitlines() if line]
    bucket = sum(files.files_under(run_dir).values())
    cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    cluster.shutdown()
    moto.terminate()
    files.remove(cache)

    print("\nevents: " + "; ".join(events))
    redone, previous = 0, 0
    for _, step in monitor.steps:  # a restart goes back to its checkpoint's step: the difference runs again
        redone += max(0, previous - step)
        previous = step
    print(f"steps redone (seen by the monitor every {monitor.period:.0f} s): {redone}")
    tenth = seconds / 10
    print("tokens/s per tenth of the run: " + ", ".join(
        f"{sum(r['tokens_per_sec'] for r in part) / len(part):,.0f}" if (part := [
            r for r in rows if "tokens_per_sec" in r and i * tenth <= r["elapsed_s"] < (i + 1) * tenth]) else "-"
        for i in range(10)))
    print(f"bucket: {bucket / 1e6:,.1f} MB; local cache: {cache_bytes / 1e6:,.1f} MB")
    start = monitor.first_checkpoint or 0.0
    print("\n| process | RSS after the first checkpoint (GiB) | at its last sample | growth |")
    print("| --- | --- | --- | --- |")
    worst = 0.0
    for role, samples in monitor.rss.items():
        after = [(t, r) for t, r in samples if t >= start]
        if len(after) < 2:
            continue
        growth = after[-1][1] / after[0][1] - 1
        worst = max(worst, growth)
        print(f"| {role} | {after[0][1]:.3f} | {after[-1][1]:.3f} | {growth:+.1%} |")
    print(f"\nlargest growth {worst:+.1%} (goal ≤ +10%)")


if __name__ == "__main__":
    main()
