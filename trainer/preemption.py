"""Preemption notices that reach a training run, so that it checkpoints at the step it reached and loses none.

Used by `raygpt train` (trainer/loop.py on the workers, trainer/driver.py on the driver); not run by hand.

Three ways a notice arrives, each checked between steps and agreed by every rank at the same step:
- **SIGTERM to a worker** (Kubernetes deletes the pod and signals its processes, then kills them after the grace
  period; `ray stop`): a handler on the worker process's main thread — Ray Train runs the training loop in another
  thread, so it is installed through the worker actor's own `execute` — sets a flag. A second SIGTERM ends the
  process at once (the commit record is written last and atomically, so no partial commit remains).
- **A node drain** (`ray drain-node`, the autoscaler's spot preemption path): Ray Core marks the node draining, Ray
  Train's PreemptionWatcher (polling `get_draining_nodes`) tells every worker; rank 0 looks at its copy every
  `POLL_S` seconds of its clock and tells the others (`_draining`).
- **SIGTERM to the driver**: its handler posts a stop request to a named actor (`StopRequests`) that rank 0 polls.

The loop then saves a checkpoint at the current step synchronously, with the reason in its commit record, and returns;
the driver starts the group again (without the draining node), or, when it was the one stopped, exits with one line.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

POLL_S = 1.0  # seconds between polls of the drain state and the driver's stop requests (a barrier each)
SIGNALLED = threading.Event()  # this worker process was sent SIGTERM
REASONS = {1: "SIGTERM to a worker", 2: "a node of the group is draining (preemption)", 3: "SIGTERM to the driver"}


def _on_sigterm(signum: int, frame: Any) -> None:
    if SIGNALLED.is_set():
        os._exit(128 + signum)  # a second signal: go now
    SIGNALLED.set()


def _install() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


@ray.remote(num_cpus=0)
class StopRequests:
    """The driver's stop request, where every worker can see it (a named actor of the run's job)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = reason

    @ray.method(enable_task_events=False)  # polled every second by rank 0: the GCS need not keep each call
    def requested(self) -> str | None:
        return self.reason


class Preemption:
    """One worker's view of the notices above; `check` is called by every rank after every step."""

    def __init__(self, stop_actor: str | None):
        self.rank = dist.get_rank()
        self.stop = None
        if self.rank == 0 and stop_actor is not None:
            try:
                self.stop = ray.get_actor(stop_actor)
            except ValueError:  # a driver without one (tests that run the loop directly)
                self.stop = None
        in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        actor = ray.get_runtime_context().current_actor if in_actor else None
        if actor is not None and hasattr(actor, "execute"):  # a Ray Train worker: its main thread takes signals
            ray.get(actor.execute.remote(_install))

    def _driver_asks(self) -> bool:
        """Whether the driver posted a stop request (a driver that cannot be asked is Ray's to clean up)."""
        try:
            return ray.get(self.stop.requested.remote(), timeout=30) is not None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            self.stop = None
            return False

    def check(self, poll: bool) -> str | None:
        """The agreed reason to stop now, or None. `poll` (rank 0's clock, already agreed) also has rank 0 look at
        Ray's drain notice and the driver's stop requests, and tell the others."""
        code = torch.tensor([1 if SIGNALLED.is_set() else 0], dtype=torch.int64)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        found = 1 if int(code[0]) else 0
        if poll and not found:
            if _draining():  # every rank reads its own copy; rank 0's counts
                found = 2
            elif self.stop is not None and self._driver_asks():
                found = 3
            agreed = torch.tensor([found], dtype=torch.int64)
            dist.broadcast(agreed, src=0)
            found = int(agreed[0])
        return REASONS[found] if found else None


def _draining() -> bool:
    """Whether Ray Train told this worker that a node of its group is draining. Ray Train's watcher sends the notice
    to every worker of the group; `ray.train.get_preemption_info()` returns rank 0's copy through a barrier on a Ray
    actor, a task per rank per call whose events the GCS keeps (polled every second, they grew the GCS by a third in a
    30-minute soak). Each rank reads its own copy directly and our broadcast of rank 0's agrees on it; where that
    internal context is missing (another Ray version), the public call (every rank polls, so its barrier holds)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info is not None
    except (ImportError, AttributeError, RuntimeError):
        return ray.train.get_preemption_info() is not None


def stop_requests(name: str) -> Any:
    """The driver's `StopRequests` actor, on the driver's own node: it lives as long as the driver, whatever node
    goes away."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return StopRequests.options(name=name, scheduling_strategy=here).remote()  # type: ignore[attr-defined]


def driver_handler(stop: Any) -> Any:
    """The driver's SIGTERM handler: the first signal asks the workers to checkpoint and stop; a second one ends the
    driver at once (no commit is left half written). Returns the handler it replaced."""

    def handler(signum: int, frame: Any) -> None:
        if getattr(handler, "fired", False):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        handler.fired = True  # type: ignore[attr-defined]
        print("[train] SIGTERM: the workers checkpoint at their current step and stop (a second SIGTERM ends now)",
              flush=True)
        stop.request.remote(REASONS[3])

    return signal.signal(signal.SIGTERM, handler)
