"""The local Ray that `raygpt` starts: its workers run at normal priority, so a busy process elsewhere on the machine
takes a fair share of a core from a training rank instead of nearly all of it (Ray's default is nice 15)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from cluster.cli import main
from cluster.ray_connect import require_gpus
from tests.conftest import SHAKESPEARE


def test_local_workers_run_at_normal_priority(ray_session: None) -> None:
    @ray.remote(num_cpus=0.5)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get([niceness.remote(), niceness.remote()]) == [0, 0]


@pytest.mark.parametrize("command, override", [
    ("run", "quantize.num_gpus=1"), ("run", "cluster.use_gpu=true"), ("eval", "eval.num_gpus=0.5"),
    ("quantize", "quantize.num_gpus=1"),
])
def test_gpus_a_local_ray_lacks_are_refused_in_one_line_before_anything_runs(
    command: str, override: str, ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Ray would keep a task asking for a GPU pending forever on a machine without one: refused up front instead
    (`raygpt run` before its first stage): the run directory holds only its lock and console log."""
    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this machine's Ray has GPUs")
    run_dir = tmp_path / "run"
    assert main([command, SHAKESPEARE, f"run_dir={run_dir}", override]) == 2
    err = capsys.readouterr().err.strip()
    setting = override.split("=")[0]
    assert err.startswith(f"raygpt: error: {setting} asks for ") and "local Ray on this machine has 0" in err, err
    assert "\n" not in err
    assert {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")} <= {".lock", "logs", "logs/console.log"}
    require_gpus(setting, 0)  # asking for none is always fine
