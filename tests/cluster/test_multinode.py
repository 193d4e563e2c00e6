"""Scale-out on this machine: a real 2-node Ray cluster (two raylets) with token authentication, where `raygpt submit`
runs a short training whose workers land on different nodes; `raygpt jobs`; a job without the token is refused; and
Ray's fake multi-node autoscaler scaling up for a training job from 0 workers and back down when idle.

Clusters here are started in-process (`ray.cluster_utils.Cluster`, `ray._private.node.Node`) and shut down by
killing their own processes: `ray stop` would also kill the session's local Ray that other tests use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.cli import main
from core import files
from core.layout import RunLayout
from model.checkpoint import load_checkpoint
from tests.cluster.conftest import free_port, wait_for_job_server
from tests.conftest import BASE, REPO, SHAKESPEARE, bucket_copy
from trainer import checkpoints
from trainer.data import SampleOrder, SampleReader
from trainer.metrics import batch_digest


@pytest.fixture(scope="module")
def cluster(cluster_env: None, ray_session: None) -> Iterator[Cluster]:
    """A head (dashboard + job server on 127.0.0.1) and one worker node, 2 CPUs each."""
    port = free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": port, "gcs_server_port": free_port(),
                        "dashboard_agent_listen_port": free_port(),
                        # a killed node is declared dead after ~3 s (Ray's default: ~15-60 s), for the elastic test
                        "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                                           "health_check_failure_threshold": 3}},
    )
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    cluster.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    wait_for_job_server(cluster.url)  # type: ignore[attr-defined]
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def two_nodes(cluster: Cluster) -> str:
    """The job server URL of that cluster."""
    return cluster.url  # type: ignore[attr-defined]


def test_submit_trains_across_two_nodes(
    two_nodes: str, prepared: Path, tmp_path: Path, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bucket is the only storage the two nodes share: run_dir (data, checkpoints, metrics) is an s3:// URI."""
    run_dir = f"{s3_bucket}/{tmp_path.name}"
    bucket_copy(prepared, f"{run_dir}/data")
    overrides = [f"run_dir={run_dir}", *BASE, "train.max_steps=6", "train.checkpoint_every=6", "train.eval_every=6",
                 "cluster.num_workers=2", "cluster.cpus_per_worker=1", "cluster.placement_strategy=STRICT_SPREAD"]
    rc = main(["submit", "--address", two_nodes, "--working-dir", str(REPO), "--job-id", "raygpt-2node",
               "--", "train", SHAKESPEARE, *overrides])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, out[-3000:] + captured.err[-2000:]
    assert "raygpt-2node SUCCEEDED" in out
    nodes = dict(re.findall(r"\[train\] rank (\d)/2 on node (\w+)", out))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"]  # the two ranks ran on different nodes
    loaded = load_checkpoint(run_dir)  # the published pointer in the bucket → the model, fetched to the cache
    assert loaded.config.n_layer == 2 and loaded.step == 6
    layout = RunLayout.of(run_dir)
    assert files.read_json(f"{layout.checkpoint_dir(6)}/commit.json")["world_size"] == 2
    assert [json.loads(m)["step"] for m in files.read_text(layout.metrics).splitlines()][-1] == 6
    assert not (tmp_path / "run").exists() and not any(REPO.glob(f"runs/{tmp_path.name}*"))

    assert main(["jobs", "list", "--address", two_nodes]) == 0
    assert "raygpt-2node  SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "status", "raygpt-2node", "--address", two_nodes]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    assert main(["jobs", "logs", "raygpt-2node", "--address", two_nodes]) == 0
    assert "[train] step 6/6" in capsys.readouterr().out


def test_prepare_from_the_bucket_on_two_nodes_writes_the_bytes_of_one(
    two_nodes: str, tmp_path: Path, s3_bucket: str, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corpus of text files, a JSONL file and a Parquet file in the bucket, cut into ~18 units; `prepare` submitted
    to the 2-node cluster (its tasks on both nodes, MinHash on) writes the same bytes as on the session's 1-node Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paragraphs = (shared_data / "tinyshakespeare" / "input.txt").read_text().split("\n\n")
    corpus = tmp_path / "corpus"
    (corpus / "texts").mkdir(parents=True)
    for i in range(6):
        (corpus / "texts" / f"part{i}.txt").write_text("\n\n".join(paragraphs[i * 600:(i + 1) * 600]))
    (corpus / "records.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[3600:5600]))
    rows = paragraphs[5600:]
    urls = [f"https://example.com/{i}" for i in range(len(rows))]  # a column prepare does not read
    pq.write_table(pa.table({"text": rows, "url": urls}), corpus / "rows.parquet", row_group_size=200)
    prefix = bucket_copy(corpus, f"{s3_bucket}/{tmp_path.name}/corpus")
    overrides = [*BASE, "data.tokenizer.vocab_size=512", "data.seq_len=64", "data.unit_bytes=60000",
                 "data.clean.minhash.enabled=true",
                 f"data.sources=[{{path: {prefix}/texts, type: text, split_by: paragraph}}, "
                 f"{{path: {prefix}/records.jsonl}}, {{path: {prefix}/rows.parquet}}]"]
    two, one = f"{s3_bucket}/{tmp_path.name}/two", f"{s3_bucket}/{tmp_path.name}/one"
    rc = main(["submit", "--address", two_nodes, "--working-dir", str(REPO), "--job-id", "raygpt-2node-prepare",
               "--", "prepare", SHAKESPEARE, f"run_dir={two}", *overrides])
    out = capsys.readouterr().out
    assert rc == 0 and "raygpt-2node-prepare SUCCEEDED" in out, out[-3000:]
    units = re.search(r"read, deduplicated and wrote (\d+) unit\(s\) on 2 node\(s\)", out)
    assert units and int(units[1]) > 12, out[-3000:]
    assert main(["prepare", SHAKESPEARE, f"run_dir={one}", *overrides]) == 0
    assert "on 1 node(s)" in capsys.readouterr().out
    written = files.files_under(f"{two}/data")
    assert len(written) > 2 * int(units[1]) and not any(name.startswith("_work") for name in written)
    assert files.files_under(f"{one}/data") == written
    assert all(files.sha256(f"{one}/data/{name}") == files.sha256(f"{two}/data/{name}") for name in written)


def test_failed_job_exits_nonzero(two_nodes: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["submit", "--address", two_nodes, "--working-dir", str(REPO), "--", "train", "configs/missing.yaml"])
    assert rc == 1 and "config file not found" in capsys.readouterr().out


def test_job_without_the_token_is_refused(two_nodes: str) -> None:
    body = json.dumps({"entrypoint": "echo not-allowed"}).encode()
    request = urllib.request.Request(f"{two_nodes}/api/jobs/", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code in (401, 403)
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    for key, value in get_auth_headers_if_auth_enabled({}).items():  # the same request with the token goes through
        request.add_header(key, value)
    with urllib.request.urlopen(request, timeout=30) as accepted:
        job_id = json.loads(accepted.read())["submission_id"]
    client = JobSubmissionClient(two_nodes)
    deadline = time.monotonic() + 60
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED


def test_local_mode_keeps_token_auth_and_opens_no_dashboard() -> None:
    """`connect()` with no address: a private local Ray, token authentication on, no dashboard/job server at all."""
    import subprocess

    code = (
        "import ray\n"
        "from cluster.config import ClusterConfig\n"
        "from cluster.ray_connect import connect\n"
        "from ray._private.authentication.authentication_utils import is_token_auth_enabled\n"
        "connect(ClusterConfig(num_cpus=1))\n"
        "print('auth', is_token_auth_enabled(), 'dashboard', repr(ray._private.worker.global_worker.node.webui_url))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "auth True dashboard None" in done.stdout or "auth True dashboard ''" in done.stdout, done.stdout


def _expected_digests(data: str, steps: int, batch: int, seed: int) -> list[str]:
    """The data digest of global steps 1..steps computed from the shards alone (no training): what any run with
    this seed and global batch must log, at any world size."""
    reader = SampleReader(data, "train")
    order = SampleOrder(reader.num_samples, seed)
    digests = []
    for step in range(steps):
        blocks = reader.read_many(order.global_batch(step, batch))
        digests.append(batch_digest([[hashlib.blake2b(b.tobytes(), digest_size=8).digest() for b in blocks]]))
    reader.close()
    return digests


def _logged(layout: RunLayout) -> list[dict]:
    """The run's metrics lines in the bucket (uploaded at every checkpoint)."""
    if not files.is_file(layout.metrics):
        return []
    return [json.loads(line) for line in files.read_text(layout.metrics).splitlines() if line.strip()]


def _succeeded(client: JobSubmissionClient, job_id: str, timeout_s: float = 300) -> str:
    """The logs of a job once it ended, after checking that it succeeded."""
    deadline = time.monotonic() + timeout_s
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-4000:]
    return logs


def _wait(condition: Callable[[], bool], what: str, client: JobSubmissionClient, job_id: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        status = client.get_job_status(job_id)
        assert status not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED), \
            f"job {status} while waiting for {what}:\n{client.get_job_logs(job_id)[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{client.get_job_logs(job_id)[-4000:]}"
        time.sleep(0.5)


def _committed_world_size(layout: RunLayout) -> int | None:
    """The worker count of the run's newest committed checkpoint, None before the first."""
    newest = checkpoints.newest(layout)
    return newest.record["world_size"] if newest is not None else None


def _worker_node(cluster: Cluster) -> Any:
    """The cluster's worker node; a test that failed between removing it and adding one back left none: add it here,
    so that one failure does not fail the tests after it."""
    if not cluster.worker_nodes:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
    return next(iter(cluster.worker_nodes))


def test_an_elastic_group_shrinks_when_a_node_is_lost_and_grows_back(
    cluster: Cluster, prepared: Path, tmp_path: Path, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cluster.num_workers: [1, 2]`, one 2-CPU worker per node, checkpoints every 2 s (the bucket is the only
    shared storage). The worker node is removed mid-run (its raylet and workers killed): the group goes on with 1
    worker from the newest checkpoint. A new node is added: at the next resize check the group grows back to 2. The
    run finishes, and its metrics hold every step once, trained on exactly the global batches the data order
    defines — those of an uninterrupted run."""
    run_dir = f"{s3_bucket}/{tmp_path.name}"
    bucket_copy(prepared, f"{run_dir}/data")
    steps, batch = 200, 8
    overrides = [f"run_dir={run_dir}", *BASE, f"train.max_steps={steps}", "train.checkpoint_every=100000",
                 "train.checkpoint_every_s=2", "train.eval_every=100000", f"train.global_batch_size={batch}",
                 "train.precision=fp32", "cluster.num_workers=[1, 2]", "cluster.cpus_per_worker=2",
                 "cluster.elastic_resize_s=2", "cluster.worker_start_timeout_s=10", "cluster.max_failures=3"]
    job_id = f"raygpt-elastic-{tmp_path.name}"
    assert main(["submit", "--address", cluster.url, "--working-dir", str(REPO), "--job-id", job_id, "--no-wait",  # type: ignore[attr-defined]
                 "--env", 'RAYGPT_TEST_FAULTS={"step_ms": 100}', "--", "train", SHAKESPEARE, *overrides]) == 0
    client = JobSubmissionClient(cluster.url)  # type: ignore[attr-defined]
    layout = RunLayout.of(run_dir)
    worker_node = _worker_node(cluster)

    started = time.monotonic()
    # the loss comes after 2 workers have committed a checkpoint: the shrunken group resumes from it, so the metrics
    # show 2, 1, 2 (removing the node earlier would have the 1-worker group redo every step from the start)
    _wait(lambda: _committed_world_size(layout) == 2, "a checkpoint committed by 2 workers", client, job_id)
    print(f"2 workers committed after {time.monotonic() - started:.0f}s", flush=True)
    cluster.remove_node(worker_node, allow_graceful=False)  # the node is reclaimed: its raylet and the worker on it die
    _wait(lambda: any(m["world_size"] == 1 for m in _logged(layout)), "1 worker after the loss", client, job_id)
    print(f"1 worker training after {time.monotonic() - started:.0f}s", flush=True)
    cluster.add_node(num_cpus=2)  # capacity comes back
    _wait(lambda: [m["world_size"] for m in _logged(layout)][-1:] == [2], "the group grown back to 2", client, job_id)
    print(f"2 workers again after {time.monotonic() - started:.0f}s", flush=True)
    logs = _succeeded(client, job_id)
    print(f"finished after {time.monotonic() - started:.0f}s", flush=True)

    metrics = _logged(layout)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1)), \
        [(m["step"], m["world_size"]) for m in metrics] + re.findall(r"resumed at step.*", logs)  # every step once
    sizes = [m["world_size"] for m in metrics]
    runs = [size for i, size in enumerate(sizes) if i == 0 or sizes[i - 1] != size]
    leading = [1] if runs[0] == 1 else []  # a group that started before the second node was free grew first
    assert runs == [*leading, 2, 1, 2], runs  # shrank once, grew back once
    assert [m["data_digest"] for m in metrics] == _expected_digests(f"{run_dir}/data", steps, batch, seed=1337)
    resumes = re.findall(r"resumed at step (\d+) \(written by (\d) worker\(s\), now (\d)\)", logs)
    expected = [("1", "2")] * len(leading) + [("2", "1"), ("1", "2")]
    assert [(w, n) for _, w, n in dict.fromkeys(resumes)] == expected, resumes  # (lines show twice)
    assert load_checkpoint(run_dir).step == steps


def test_a_drained_node_costs_no_step(
    cluster: Cluster, prepared: Path, tmp_path: Path, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` (the autoscaler's spot-preemption path) on the worker
    node mid-run, 2 workers spread over the 2 nodes. Ray Train tells the workers; they checkpoint the step they
    reached and stop; the driver starts the group again (the draining node takes no new workers). Every step is logged once, on the global batches of an uninterrupted run, and the final weights are
    those of an uninterrupted run of the same config on this session's local Ray (fp32, the same world size: within
    1e-6). The drained node is then reclaimed (removed) and replaced, as the autoscaler would."""
    node = _worker_node(cluster)
    run_dir = f"{s3_bucket}/{tmp_path.name}"
    bucket_copy(prepared, f"{run_dir}/data")
    steps = 30
    common = [*BASE, f"train.max_steps={steps}", "train.checkpoint_every=4", "train.eval_every=100000",
              "train.precision=fp32", "cluster.cpus_per_worker=1"]
    job_id = f"raygpt-drain-{tmp_path.name}"
    # Ray Train's drain watcher polls every second here (5 s by default), so a short run sees the drain mid-way
    assert main(["submit", "--address", cluster.url, "--working-dir", str(REPO), "--job-id", job_id, "--no-wait",  # type: ignore[attr-defined]
                 "--env", 'RAYGPT_TEST_FAULTS={"step_ms": 200}', "--env", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S=1",
                 "--", "train", SHAKESPEARE, f"run_dir={run_dir}", *common, "cluster.placement_strategy=SPREAD"]) == 0
    client = JobSubmissionClient(cluster.url)  # type: ignore[attr-defined]
    layout = RunLayout.of(run_dir)
    _wait(lambda: checkpoints.newest(layout) is not None, "a committed checkpoint", client, job_id)
    subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address,
                    "--node-id", node.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message", "spot reclaim", "--deadline-remaining-seconds", "120"],
                   check=True, capture_output=True, timeout=60)
    logs = _succeeded(client, job_id)
    cluster.remove_node(node, allow_graceful=False)  # reclaimed
    cluster.add_node(num_cpus=2)  # and replaced, for the tests after this one
    cluster.wait_for_nodes()

    stops = re.findall(r"\[train\] stopped at step (\d+) \(a node of the group is draining \(preemption\)\)", logs)
    assert len(set(stops)) == 1, logs[-4000:]
    stop = int(stops[0])
    assert 4 <= stop < steps
    metrics = _logged(layout)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))  # every step once: none redone, none missing
    assert [m["step"] for m in metrics if "resume_read_bytes" in m] == [stop + 1]
    assert [m["data_digest"] for m in metrics] == _expected_digests(f"{run_dir}/data", steps, 8, seed=1337)
    local = tmp_path / "uninterrupted"
    shutil.copytree(prepared, local / "data")
    assert main(["train", SHAKESPEARE, f"run_dir={local}", *common]) == 0
    expected, got = load_checkpoint(local / "checkpoint").model.state_dict(), load_checkpoint(run_dir).model.state_dict()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
