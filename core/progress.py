"""Progress lines: the one format every stage prints while it works, and a throttled progress log for long loops.

    [train] step 120/400 (30%) loss 3.2 lr 0.001 eta 12s

Stages print these through plain `print` (Ray forwards workers' lines to the driver); the CLI's console filter
(`cluster.console`) recognises them by `PROGRESS` and draws them as one live bar where the console is a terminal.
"""

from __future__ import annotations

import re
import time


PROGRESS = re.compile(r"^\[(?P<stage>\w+)\] (?P<label>.+?) (?P<done>\d+)/(?P<total>\d+) \((?P<percent>\d+)%\)(?P<rest>.*)$")
"""A progress line (`progress_line`), drawn as a live bar on a terminal."""


def progress_line(stage: str, label: str, done: int, total: int, detail: str = "") -> str:
    """`[train] step 120/400 (30%) loss 3.2`: the one format of progress lines, which the console recognises."""
    percent = 100 * done // max(total, 1)
    return f"[{stage}] {label} {done}/{total} ({percent}%)" + (f" {detail}" if detail else "")


class Progress:
    """A one-line progress log for a loop that may run longer than a few seconds: a `progress_line` each time
    `every_s` seconds have passed, and the final state if any line was shown (a quick loop prints nothing). Used where
    tqdm would be: its redrawn bars do not survive Ray's line-by-line forwarding from workers."""

    def __init__(self, stage: str, label: str, total: int, every_s: float = 10.0, unit: str = "",
                 enabled: bool = True) -> None:
        self.stage, self.label, self.total, self.every_s, self.unit = stage, label, total, every_s, unit
        self.enabled, self.done, self.shown = enabled, 0, False
        self.started = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or not (now - self.last >= self.every_s or (self.done >= self.total and self.shown)):
            return
        self.last, self.shown = now, True
        rate = self.done / max(now - self.started, 1e-9)
        unit = f" {self.unit}" if self.unit else ""
        print(progress_line(self.stage, self.label, self.done, self.total, f"{rate:.1f}{unit}/s"), flush=True)
