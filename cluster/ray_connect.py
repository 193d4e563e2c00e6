"""Connecting to Ray: an existing cluster (`cluster.address` or RAY_ADDRESS) or a local one started here.

Used by every `raygpt` subcommand before it runs Ray work, e.g. `raygpt prepare configs/demo.yaml`.
"""

from __future__ import annotations

import os

import ray

from cluster.config import ClusterConfig


def connect(cfg: ClusterConfig) -> int:
    """Initialise Ray once per process and return the cluster's CPU count."""
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True, runtime_env=cfg.runtime_env or None)
        else:
            # address="local" always starts a fresh local instance (a stale ray_current_cluster file can't redirect it);
            # the dashboard stays off locally, so nothing listens beyond what Ray itself needs.
            ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
