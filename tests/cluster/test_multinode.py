"""Scale-out on this machine: a real 2-node Ray cluster (two raylets) with token authentication, where `raygpt submit`
runs a short training whose workers land on different nodes; `raygpt jobs`; a job without the token is refused; and
Ray's fake multi-node autoscaler scaling up for a training job from 0 workers and back down when idle.

Clusters here are started in-process (`ray.cluster_utils.Cluster`, `ray._private.node.Node`) and shut down by
killing their own processes: `ray stop` would also kill the session's local Ray that other tests use.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.cli import main
from model.checkpoint import load_checkpoint
from tests.conftest import BASE, REPO, SHAKESPEARE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_env() -> Iterator[None]:
    """Token authentication on (as on the cloud clusters), and `raygpt` on PATH for job entrypoints."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "PATH")}
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    yield
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def two_nodes(cluster_env: None, ray_session: None) -> Iterator[str]:
    """A head (dashboard + job server on 127.0.0.1) and one worker node, 2 CPUs each; yields the job server URL."""
    port = _free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": port, "port": _free_port()},
    )
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:  # the job server comes up a little after the head
        try:
            JobSubmissionClient(url).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    yield url
    cluster.shutdown()


def test_submit_trains_across_two_nodes(
    two_nodes: str, prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(prepared, run_dir / "data")
    shared = tmp_path / "shared-storage"  # a directory both nodes see (here: the same disk)
    overrides = [f"run_dir={run_dir}", *BASE, "train.max_steps=6", "train.checkpoint_every=6", "train.eval_every=6",
                 "cluster.num_workers=2", "cluster.cpus_per_worker=1", "cluster.placement_strategy=STRICT_SPREAD",
                 f"cluster.storage_path={shared}"]
    rc = main(["submit", "--address", two_nodes, "--working-dir", str(REPO), "--job-id", "raygpt-2node",
               "--", "train", SHAKESPEARE, *overrides])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "raygpt-2node SUCCEEDED" in out
    assert "world_rank=0" in out and "node_rank=1" in out  # the second worker ran on the second node
    model, cfg, _ = load_checkpoint(run_dir / "checkpoint")
    assert cfg.n_layer == 2 and json.loads((run_dir / "checkpoint" / "config.json").read_text())["step"] == 6
    assert any(shared.rglob("checkpoint_*"))  # Ray Train's checkpoints in the shared storage

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
    from ray._private.authentication.authentication_token_setup import AuthenticationTokenLoader

    token = AuthenticationTokenLoader.instance().get_token()  # the same request with the token goes through
    token = token if isinstance(token, str) else token.get_value() if hasattr(token, "get_value") else str(token)
    request.add_header("Authorization", f"Bearer {token}")
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
