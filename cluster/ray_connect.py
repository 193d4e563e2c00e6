"""Connecting to Ray: an existing cluster (`cluster.address` or RAY_ADDRESS) or a local one started here.

Used by every `raygpt` subcommand before it runs Ray work, e.g. `raygpt prepare configs/demo.yaml`.
"""

from __future__ import annotations

import os

import ray

from cluster.config import ClusterConfig


def start_local(num_cpus: int | None = None, **kwargs: object) -> None:
    """A private local Ray. address="local" always starts a fresh instance (a stale ray_current_cluster file can't
    redirect it); the dashboard stays off, so nothing listens beyond what Ray itself needs. Workers run at normal
    priority (Ray's default is nice 15): on a laptop any other busy process would otherwise take a core from one
    training rank almost entirely (CFS weight 1024 vs 36), and the other rank then waits for it at every all-reduce."""
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _system_config={"worker_niceness": 0},
        **kwargs,  # type: ignore[arg-type]
    )


STARTED_HERE = False
"""Whether this process connected Ray (and so may shut it down); tests share one session's Ray instead."""


def connect(cfg: ClusterConfig) -> int:
    """Initialise Ray once per process and return the cluster's CPU count."""
    global STARTED_HERE
    if not ray.is_initialized():
        STARTED_HERE = True
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True, runtime_env=cfg.runtime_env or None)
        else:
            start_local(cfg.num_cpus)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
