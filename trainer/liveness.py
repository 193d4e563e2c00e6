"""Whether the `raygpt train` driver that started a worker group is still alive, checked by the workers before every
step and commit (trainer/loop.py). Used by `raygpt train CONFIG` workers; not run by hand.

Ray ends a job's workers when its driver dies, but not at once: a worker in the middle of a step goes on until it next
talks to its raylet, and in that window it could log steps or commit a checkpoint after the run's lock was released
and another command took the run dir. A worker on the driver's machine (same boot, same pid namespace) therefore
checks the driver's process by pid and start time (so a reused pid is not mistaken for it) and stops with one line
when it is gone. Workers elsewhere, or where /proc is missing (macOS), cannot see the driver's process and rely on Ray.
"""

from __future__ import annotations

import os
from pathlib import Path


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None when there is none."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else None


def _machine() -> str | None:
    """This boot of this machine and this pid namespace: where a pid means the same process."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot.strip()}:{namespace}" if boot else None


def identity() -> dict[str, str | int] | None:
    """This process (the driver) as workers can recognise it, or None where it cannot be checked."""
    machine, started = _machine(), _start_time(os.getpid())
    return {"machine": machine, "pid": os.getpid(), "started": started} if machine and started else None


def gone(driver: dict[str, str | int] | None) -> bool:
    """True when `driver` ran on this machine and its process no longer exists (or its pid is another process now)."""
    if not driver or driver.get("machine") != _machine():
        return False
    return _start_time(int(driver["pid"])) != driver["started"]


class DriverGone(RuntimeError):
    """The driver that started this worker group died."""


def check(driver: dict[str, str | int] | None, rank: int, step: int) -> None:
    """Raise DriverGone (one line) when `driver` is gone: the worker stops before its next step or commit."""
    if gone(driver):
        assert driver is not None
        raise DriverGone(f"[train] the driver (pid {driver['pid']}) is gone: rank {rank} stops at step {step} "
                         "without committing")
