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
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster import storage
from cluster.cli import main
from cluster.layout import RunLayout
from model.checkpoint import load_checkpoint
from tests.cluster.conftest import free_port, wait_for_job_server
from tests.conftest import BASE, REPO, SHAKESPEARE, bucket_copy


@pytest.fixture(scope="module")
def two_nodes(cluster_env: None, ray_session: None) -> Iterator[str]:
    """A head (dashboard + job server on 127.0.0.1) and one worker node, 2 CPUs each; yields the job server URL."""
    port = free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": port, "gcs_server_port": free_port(),
                        "dashboard_agent_listen_port": free_port()},
    )
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    url = f"http://127.0.0.1:{port}"
    wait_for_job_server(url)
    yield url
    cluster.shutdown()


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
    assert storage.read_json(f"{layout.checkpoint_dir(6)}/commit.json")["world_size"] == 2
    assert [json.loads(m)["step"] for m in storage.read_text(layout.metrics).splitlines()][-1] == 6
    assert not (tmp_path / "run").exists() and not any(REPO.glob(f"runs/{tmp_path.name}*"))

    assert main(["jobs", "list", "--address", two_nodes]) == 0
    assert "raygpt-2node  SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "status", "raygpt-2node", "--address", two_nodes]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    assert main(["jobs", "logs", "raygpt-2node", "--address", two_nodes]) == 0
    assert "[train] step 6/6" in capsys.readouterr().out


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
