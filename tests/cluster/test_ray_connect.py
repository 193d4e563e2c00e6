"""The local Ray that `raygpt` starts: its workers run at normal priority, so a busy process elsewhere on the machine
takes a fair share of a core from a training rank instead of nearly all of it (Ray's default is nice 15)."""

from __future__ import annotations

import os

import ray


def test_local_workers_run_at_normal_priority(ray_session: None) -> None:
    @ray.remote(num_cpus=0.5)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get([niceness.remote(), niceness.remote()]) == [0, 0]
