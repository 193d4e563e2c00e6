"""Connecting to Ray: an existing cluster (`cluster.address` or RAY_ADDRESS) or a local one started here.

Used by every `raygpt` subcommand before it runs Ray work, e.g. `raygpt prepare configs/demo.yaml`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray

from core.config import ClusterConfig
from core.errors import UserError

LOCAL = False
"""Whether Ray was started on this machine by `start_local` (no autoscaler: its resources are all there will be)."""


class ResourceError(UserError):
    """A request for resources this Ray can never provide; one line instead of a task that waits forever."""


TASK_EVENTS_KEPT = 1000
"""How many tasks' events a GCS keeps (Ray's `task_events_max_num_task_in_gcs`, default 100,000) on the Rays raygpt
starts: here, and in infra/ through the head's environment (`RAY_task_events_max_num_task_in_gcs`). Each costs the
GCS ~3.3 KB (measured: +66 MB for 20,000 actor calls), and a training run makes tasks for as long as it runs: Ray
Train checks every worker's health every 2 s, so 64 workers reach Ray's default in under two hours, ~330 MB. The cap
only shortens the task history that the dashboard and `ray list tasks` show; the workers' logs are kept apart."""

LOCAL_SYSTEM_CONFIG = {
    "task_events_max_num_task_in_gcs": TASK_EVENTS_KEPT,
    "worker_niceness": 0,
    "health_check_timeout_ms": 30_000,
    "health_check_failure_threshold": 20,
}
"""Ray's settings for a local Ray. Workers run at normal priority (Ray's default is nice 15): on a laptop any other
busy process would otherwise take a core from one training rank almost entirely (CFS weight 1024 vs 36), and the other
rank then waits for it at every all-reduce. Health checks tolerate a saturated machine (a load of 10-30 on 2 cores
was seen to fail Ray's defaults, 10 s × 5, with "lagging heartbeats" and lost objects): a single node has no other
node to fail over to, so declaring it dead only loses the work; it takes 20 missed checks of 30 s here."""

STARTS = 2
"""Tries at starting a local Ray: Ray waits a fixed 30 s for its raylet, which a saturated machine can miss once."""


def start_local(num_cpus: int | None = None, **kwargs: object) -> None:
    """A private local Ray. address="local" always starts a fresh instance (a stale ray_current_cluster file can't
    redirect it); the dashboard stays off, so nothing listens beyond what Ray itself needs. A start that times out
    (a busy machine) is tried once more, then is one line naming the cause."""
    global LOCAL
    LOCAL = True
    for attempt in range(1, STARTS + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     _system_config=LOCAL_SYSTEM_CONFIG, **kwargs)  # type: ignore[arg-type]
            return
        except Exception as e:  # Ray raises a bare Exception for the startup timeout
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()  # the half-started processes of this try
            if attempt == STARTS:
                load = os.getloadavg()[0]
                raise UserError(f"Ray did not start on this machine in {STARTS} tries of 30 s: it is saturated (load "
                                f"{load:.0f} on {os.cpu_count()} cores); retry when it is less busy, or give raygpt "
                                "a cluster (cluster.address)") from None
            print(f"[run] Ray did not start within 30 s (load {os.getloadavg()[0]:.0f} on {os.cpu_count()} cores); "
                  "trying once more", flush=True)


def connect(cfg: ClusterConfig) -> int:
    """Initialise Ray once per process and return the cluster's CPU count."""
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True, runtime_env=cfg.runtime_env or None)
        else:
            start_local(cfg.num_cpus)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """A command's Ray: whatever the block connects (`connect`, from a stage) is shut down when it ends. Entered inside
    the console filter (`cluster.console.quiet_console`), so the workers' last lines, which arrive as Ray shuts down,
    pass through it too. A Ray already running when the block starts (the tests' shared one) is left running."""
    already = ray.is_initialized()
    try:
        yield
    finally:
        if not already and ray.is_initialized():
            ray.shutdown()


def require_gpus(setting: str, count: float) -> None:
    """Refuse, in one line, `count` GPUs asked for by `setting` on a local Ray that has fewer (Ray would keep such a
    task pending forever, waiting for a node that cannot come). A connected cluster may add GPU nodes on demand
    (its autoscaler), so there the request stands."""
    have = ray.cluster_resources().get("GPU", 0)
    if count > 0 and LOCAL and have < count:
        raise ResourceError(f"{setting} asks for {count:g} GPU(s) but the local Ray on this machine has {have:g}; "
                            "set it to 0 here, or submit to a cluster with GPU nodes")
