"""A long training run under the faults of a spot cluster, watched for leaks: the `tiny` preset (gpt2-124m's smaller
cousin) on a 2-node local Ray cluster, run_dir on an S3 bucket, asynchronous checkpoints every ~2 minutes, one
worker SIGKILLed and one node drained on the way. Not part of `make test`.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--every-s 120]

Reports: tokens/s per tenth of the run, the steps redone (after the SIGKILL: the steps since the last commit; after
the drain: none; read from rank 0's metrics mirror, one line per step, every second), the bucket's bytes and the
local cache's size, and the resident memory of every process of the run — the driver (`raygpt train`), each training
worker, the raylets and the GCS — sampled every 15 s. A process's baseline is its first sample after its group's
first checkpoint (the checkpoint's host buffers are allocated then). Goal: no process grows by more than 10%.
The cluster bounds the task events its GCS keeps, as infra/ does (`cluster.ray_connect.TASK_EVENTS_KEPT`).

The bucket is moto's S3 server in a separate process (its memory holds the bucket and is not the run's). The kill
comes at 1/3 of the run, the drain at 2/3; the drained node is then removed and a fresh one added, as a cloud would.
The run ends as a Kubernetes pod deletion would end it: SIGTERM to the driver, which has the workers commit the
step they reached.
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
from cluster.ray_connect import TASK_EVENTS_KEPT  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "configs" / "shakespeare.yaml"


def _processes(driver: int, session: str = "") -> dict[str, psutil.Process]:
    """The run's processes by role: the driver (`raygpt train`), the training workers, raylets and the GCS (of the
    cluster of Ray session `session`, whose name both command lines carry; not another Ray on the machine)."""
    found = {"driver": psutil.Process(driver)}
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if "RayTrainWorker" in line or proc.info["name"] == "ray::RayTrainWorker":
            found[f"worker pid {proc.pid}"] = proc
        elif session not in line:
            continue
        elif "raylet" in (proc.info["name"] or ""):
            found[f"raylet pid {proc.pid}"] = proc
        elif "gcs_server" in (proc.info["name"] or ""):
            found[f"gcs pid {proc.pid}"] = proc
    return found


class Monitor:
    """Samples every process's RSS every `period` seconds, and the last step in rank 0's metrics mirror every
    second, on a thread."""

    def __init__(self, metrics_local: Path, driver: int, session: str, period: float = 15.0):
        self.metrics_local, self.driver, self.session, self.period = metrics_local, driver, session, period
        self.rss: dict[str, list[tuple[float, float]]] = {}
        self.first_seen: dict[str, float] = {}
        self.redone = 0
        self.last_step = 0
        self.first_checkpoint: float | None = None
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _steps(self) -> None:
        try:
            lines = self.metrics_local.read_text().splitlines()
            step = json.loads(lines[-1])["step"] if lines else 0
        except (OSError, ValueError, KeyError):
            return
        self.redone += max(0, self.last_step - step)  # a resume cut the mirror back to its checkpoint's step
        self.last_step = step
        if self.first_checkpoint is None and any('"checkpoint_s"' in line for line in lines):
            self.first_checkpoint = time.monotonic() - self.started

    def _loop(self) -> None:
        ticks = 0
        while not self.stop.wait(1.0):
            self._steps()
            ticks += 1
            if ticks % int(self.period):
                continue
            now = time.monotonic() - self.started
            for role, proc in _processes(self.driver, self.session).items():
                try:
                    self.rss.setdefault(role, []).append((now, proc.memory_info().rss / 2**30))
                    self.first_seen.setdefault(role, now)
                except psutil.Error:
                    continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--every-s", type=float, default=120)
    args = parser.parse_args()
    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="soak", AWS_SECRET_ACCESS_KEY="soak",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", DS_ACCELERATOR="cpu",
                      RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="1",
                      # as infra/ starts a cluster's head: the GCS keeps a bounded number of tasks' events
                      RAY_task_events_max_num_task_in_gcs=str(TASK_EVENTS_KEPT))
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import boto3
    from ray.cluster_utils import Cluster

    from core import files
    from core.layout import RunLayout
    from model.flops import machine_header
    from trainer.metrics import read_metrics

    deadline = time.monotonic() + 30
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket="soak")
            break
        except Exception:
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.5)
    print(machine_header(), flush=True)
    cache = Path(tempfile.mkdtemp(prefix="raygpt-soak-cache-"))
    os.environ["RAYGPT_CACHE"] = str(cache)  # before the nodes start: their workers inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    run_dir = "s3://soak/run"
    seconds = args.minutes * 60
    overrides = [f"run_dir={run_dir}", "model.preset=tiny", "model.overrides={}", "train.max_steps=10000000",
                 "train.time_budget_s=null", f"train.checkpoint_every_s={args.every_s}",
                 "train.checkpoint_every=10000000", "train.eval_every=500", "train.log_every=1",
                 "train.micro_batch_size=8", "cluster.num_workers=2", "cluster.cpus_per_worker=1",
                 "cluster.placement_strategy=SPREAD", "cluster.max_failures=2"]
    raygpt = str(Path(sys.executable).parent / "raygpt")
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    subprocess.run([raygpt, "prepare", str(SHAKESPEARE), *overrides], env=env, check=True)
    layout = RunLayout.of(run_dir)
    # the driver is `raygpt train` in its own process, as a user (or a Kubernetes pod) runs it
    driver = subprocess.Popen([raygpt, "train", str(SHAKESPEARE), *overrides], env=env, stderr=subprocess.PIPE, text=True)
    monitor = Monitor(layout.metrics_local, driver.pid, cluster.head_node.session_name)
    events: list[str] = []

    def event(what: str) -> None:
        events.append(f"{time.monotonic() - monitor.started:.0f}s: {what}")
        print(f"[soak] {events[-1]}", flush=True)

    def until(fraction: float) -> None:
        time.sleep(max(0.0, fraction * seconds - (time.monotonic() - monitor.started)))
        assert driver.poll() is None, f"the run ended early: {driver.stderr.read() if driver.stderr else ''}"

    until(1 / 3)
    victim = next((p for role, p in _processes(driver.pid).items() if role.startswith("worker")), None)
    assert victim is not None, "no training worker found"
    event(f"SIGKILL worker pid {victim.pid} at step {monitor.last_step}")
    victim.send_signal(signal.SIGKILL)
    until(2 / 3)
    node = next(iter(cluster.worker_nodes))
    event(f"drain node {node.node_id[:8]} at step {monitor.last_step}")
    subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address,
                    "--node-id", node.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                    "soak", "--deadline-remaining-seconds", "120"], check=True, capture_output=True)
    time.sleep(60)
    cluster.remove_node(node, allow_graceful=False)
    cluster.add_node(num_cpus=2)
    event("drained node removed, a fresh one added")
    until(1)
    event(f"SIGTERM to the driver at step {monitor.last_step}")
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=600)
    event(f"driver exited {driver.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    monitor.stop.set()
    monitor.thread.join()
    rows = read_metrics(files.read_text(layout.metrics))
    bucket = sum(files.files_under(run_dir).values())
    cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    cluster.shutdown()
    moto.terminate()
    files.remove(cache)

    print("\nevents: " + "; ".join(events))
    print(f"steps logged: {len(rows)} (1..{rows[-1]['step']}); steps redone: {monitor.redone}")
    begin, tenth = rows[0]["wall_time"], (rows[-1]["wall_time"] - rows[0]["wall_time"]) / 10
    print("tokens/s per tenth of the run: " + ", ".join(
        f"{sum(r['tokens_per_sec'] for r in part) / len(part):,.0f}" if (part := [
            r for r in rows if "tokens_per_sec" in r and i <= (r["wall_time"] - begin) / tenth < i + 1]) else "-"
        for i in range(10)))
    print(f"bucket: {bucket / 1e6:,.1f} MB; local cache: {cache_bytes / 1e6:,.1f} MB "
          f"(RAYGPT_CACHE_GB bound: {os.environ.get('RAYGPT_CACHE_GB', '20')} GB)")
    print("\n| process | RSS at baseline (GiB) | at its last sample | growth | MB at each fifth after baseline |")
    print("| --- | --- | --- | --- | --- |")
    worst = 0.0
    for role, samples in monitor.rss.items():
        # a process started later (a restarted worker, a new node's raylet) from its own group's first checkpoint
        begins = max(monitor.first_checkpoint or 0.0, monitor.first_seen[role] + 1.25 * args.every_s)
        after = [(t, r) for t, r in samples if t >= begins and r > 0]  # a dead process (zombie) reads 0
        if len(after) < 2:
            continue
        growth = after[-1][1] / after[0][1] - 1
        worst = max(worst, growth)
        path = " ".join(f"{after[min(len(after) - 1, k * len(after) // 5)][1] * 1024:.0f}" for k in range(1, 6))
        print(f"| {role} | {after[0][1]:.3f} | {after[-1][1]:.3f} | {growth:+.1%} | {path} |")
    print(f"\nlargest growth {worst:+.1%} (goal ≤ +10%)")


if __name__ == "__main__":
    main()
