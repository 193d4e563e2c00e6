"""`raygpt serve TARGET`: what to serve (a run directory or a checkpoint, and its serve section), the checks before
anything starts (the API key rule, a free port), and serving until Ctrl-C. The deployment itself is cluster/serve.py.

    raygpt serve runs/demo --port 8001
"""

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

from cluster.config import ClusterConfig, ServeConfig
from cluster.serve import start, stop
from core.errors import UserError
from core.layout import RunLayout, join


class Target(NamedTuple):
    """What `raygpt serve TARGET [serve.key=value ...]` serves, and how."""

    checkpoint: str
    serve: ServeConfig
    cluster: ClusterConfig
    model_name: str
    log_file: Path
    """where the console's filtered lines go (the run's console.log, or a temp file for a bare checkpoint)"""


def resolve_target(target: str, overrides: list[str]) -> Target:
    """A local run directory (its config.yaml's serve and cluster sections; its final checkpoint — with a finetune
    section the fine-tuned one — or serve.checkpoint) or a checkpoint folder, local or a URI (default sections)."""
    from cluster.config import load_config, load_serve_config
    from model.checkpoint import CONFIG
    from model.checkpoint import load_config as checkpoint_config

    bad = [o for o in overrides if not o.startswith("serve.")]
    if bad:
        raise UserError(f"{bad[0]}: only serve.* keys can be set here (e.g. serve.max_batch=8)")
    layout = RunLayout.of(target)
    if not layout.remote and Path(layout.config).is_file():
        run = load_config(layout.config, overrides)
        cfg = run.serve
        from cluster.config import FINETUNE

        # a fine-tuned run serves the fine-tuned model (RUN_DIR/finetune, wherever RUN_DIR is now)
        final = RunLayout.of(join(layout.run_dir, FINETUNE)) if run.finetune is not None else layout
        checkpoint = str(join(layout.run_dir, cfg.checkpoint) if cfg.checkpoint else final.checkpoint)  # as moved
        checkpoint_config(checkpoint)  # a missing or broken checkpoint: one line here, not a replica's traceback
        return Target(checkpoint, cfg, run.cluster, cfg.model_name or run.name, layout.console_log)
    if (Path(target) / CONFIG).is_file() or "://" in target:  # a checkpoint (a URI: checked when it loads)
        cfg = load_serve_config(overrides)
        if cfg.checkpoint:
            raise UserError("serve.checkpoint: only for a run directory; give the checkpoint folder itself")
        name = cfg.model_name or Path(target.rstrip("/")).name
        return Target(target, cfg, ClusterConfig(), name, Path(tempfile.gettempdir()) / "raygpt-serve.log")
    raise UserError(f"{target}: neither a run directory (no config.yaml) nor a checkpoint (no {CONFIG})")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_listen(cfg: ServeConfig, cluster: ClusterConfig) -> None:
    """Before anything starts: a host other than loopback needs the API key (or serve.allow_public), and a local
    server's port must be free. Ray Serve binds its proxy with SO_REUSEPORT, so a second server on a busy port would
    silently share it (clients' requests split between two models); a plain bind here fails instead. On a cluster
    (an address is set) the proxy listens on the head node, not here: only the key rule applies."""
    import socket

    if cfg.host not in LOOPBACK and not os.environ.get(cfg.api_key_env) and not cfg.allow_public:
        raise UserError(f"serve.host {cfg.host} listens beyond this machine without an API key: set {cfg.api_key_env}, "
                        "or serve.allow_public=true to serve to anyone who can reach it")
    if cluster.address or os.environ.get("RAY_ADDRESS"):
        return
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((cfg.host, cfg.port))
        except OSError as e:
            raise UserError(f"serve.port {cfg.port} on {cfg.host} is in use ({_holder(cfg)}); stop it or choose "
                            f"another --port ({e.strerror})") from None


def _holder(cfg: ServeConfig) -> str:
    """What answers on the port: a raygpt server names its model (when its key is not needed), else a process."""
    import urllib.request

    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else "::1" if cfg.host == "::" else cfg.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            health = json.loads(answer.read(4096))
    except (OSError, ValueError):
        return "by another process"
    if isinstance(health, dict) and "model" in health:
        return f"raygpt serve of {health['model']!r} answers there"
    return "a keyed raygpt server answers there" if health == {"status": "ok"} else "by another process"


def serve_forever(target: Target) -> None:
    """`raygpt serve`: connect to Ray, deploy, print where, and keep serving until Ctrl-C / SIGTERM (e.g. `raygpt jobs
    stop`), then take the app down (Serve apps outlive their driver on a cluster)."""
    import signal

    from cluster import ray_connect

    check_listen(target.serve, target.cluster)
    ray_connect.connect(target.cluster)
    ray_connect.require_gpus("serve.num_gpus", target.serve.num_gpus)
    url = start(target.checkpoint, target.serve, target.model_name)
    keyed = " (API key required)" if os.environ.get(target.serve.api_key_env) else ""
    print(f"[serve] {target.model_name} ({target.checkpoint}) at {url}{keyed}; "
          f"{target.serve.min_replicas}-{target.serve.max_replicas} replica(s); Ctrl-C stops", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        done.wait()
    finally:
        stop()
        print("[serve] stopped", flush=True)
