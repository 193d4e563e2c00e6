"""Hooks a training worker calls at the points where tests inject faults; in production they do nothing.

The driver builds them from RAYGPT_TEST_FAULTS (JSON, set only by tests, e.g. {"exit_after_step": 7}) and hands
them to every worker (`trainer.driver.injected_faults`); the loop and the checkpoint component call the hooks and
never test for a fault themselves. Not run by hand.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from trainer import preemption

HANDLER_TIMEOUT_S = 60.0


class Hooks:
    """The points of a worker's life a fault can be injected at (no-ops)."""

    def after_step(self, step: int, rank: int, world: int) -> None:
        """After optimizer step `step` of this rank."""

    def after_state_file(self, step: int, rank: int, world: int) -> None:
        """In a save of `step`, once this rank's state file is in storage (before the others' and the commit)."""


class InjectedFaults(Hooks):
    """Tests only; each fault fires once per run (a marker file under the temp dir, named by the run's `token`, which
    the driver draws). exit_after_step: the last rank exits after that step;
    kill_in_upload: rank 0 is SIGKILLed while the save of that step is in flight (its state file written, the rest
    and the commit not); term_after_step: the last rank is sent SIGTERM once after that step; step_ms: every step of rank 0 lasts at least
    that long (so a test can act mid-run on any CPU)."""

    def __init__(self, faults: dict[str, int]):
        self.faults = faults

    def _once(self, fault: str) -> bool:
        """True the first time any worker of this run asks (the marker is created atomically)."""
        marker = Path(tempfile.gettempdir()) / f"raygpt-fault-{self.faults.get('token', 0)}-{fault}"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def after_step(self, step: int, rank: int, world: int) -> None:
        last = rank == world - 1
        if step == self.faults.get("exit_after_step") and last and self._once("exit"):
            os._exit(1)  # a worker dying mid-run
        if step in (self.faults.get("term_after_step"), self.faults.get("term_twice_after_step")) and last \
                and self._once("term"):
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice (Kubernetes, a spot reclaim) to this worker
            _handled(preemption.SIGNALLED)
        if (slow := self.faults.get("step_ms")) and rank == 0:
            time.sleep(slow / 1000)

    def after_state_file(self, step: int, rank: int, world: int) -> None:
        if step == self.faults.get("kill_in_upload") and rank == 0 and self._once("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        twice = self.faults.get("term_twice_after_step")
        if twice is not None and step >= twice and rank == world - 1 and self._once("term again"):
            os.kill(os.getpid(), signal.SIGTERM)  # impatient: the second notice ends the process mid-checkpoint
            _handled(threading.Event())  # never set: the handler ends the process


def _handled(done: threading.Event) -> None:
    """Until the signal just sent has been handled. Python runs handlers on the main thread, which in a Ray worker
    sits in Ray's task loop and looks at signals only now and then (up to seconds on a loaded machine): without
    waiting, a fast step could pass before the notice is seen, and the test would not know which step it hit."""
    if not done.wait(HANDLER_TIMEOUT_S):
        raise RuntimeError(f"the injected SIGTERM was not handled within {HANDLER_TIMEOUT_S} s")


def hooks(faults: dict[str, int]) -> Hooks:
    return InjectedFaults(faults) if faults else Hooks()
