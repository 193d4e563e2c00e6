"""What a stage command prints: raygpt's own lines on the console, everything (Ray's and DeepSpeed's internals
included) in the run's log file. `--verbose` shows everything on the console too.

    raygpt run configs/demo.yaml              # stage lines, progress, summaries; the rest in RUN_DIR/logs/console.log
    raygpt --verbose run configs/demo.yaml    # everything

Ray forwards its workers' output to the driver line by line, prefixed `(Actor pid=N)`, through sys.stdout /
sys.stderr; Ray's own Python loggers and Ray Data's progress bars write to the same streams. `quiet_console` puts a
filter in front of both for the command's lifetime: a worker line reaches the console only if it is one of raygpt's
(`[train] ...`), repeated lines are shown once, and Ray's INFO/DEBUG records, progress bars and library warnings go to
the log file only. Lines that are neither (our own, errors, tracebacks) pass as they are.

Progress is one line per interval (`progress_line`: `[train] step 120/400 (30%) loss 3.2 ... eta 12s`); where the
console is a terminal, the filter draws those lines as one live bar at the bottom instead, other lines scrolling above
it, and the bar's last state stays when the command ends.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from core.files import open_append
from core.progress import PROGRESS

OURS = re.compile(r"^\[(run|prepare|train|eval|quantize|sample|submit|report|serve)\b")
"""raygpt's own progress and summary lines."""
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RAY_PREFIX = re.compile(r"^\((?P<who>[^()]*?)(?: pid=\d+[^)]*)?\)\s?")
"""What Ray puts before a forwarded worker line: `(RayTrainWorker pid=28268)`, `(pid=27344)`, `(_phase2 pid=1, ip=x)`."""
WARNING = re.compile(r"\b\w*Warning: ")
"""A library warning (`warnings.warn`): dropped with its source line, the next one."""
NOISE = [
    re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|DEBUG)\b"),  # Ray's INFO / DEBUG log records
    re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|WARNING|DEBUG)\]"),  # DeepSpeed's logger
    re.compile(r"^(INFO|DEBUG) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ "),  # Ray Serve's logger
    re.compile(r"\d+%\|.*\||\[\d+:\d\d[<,\]]"),  # progress bars and counters (tqdm, Ray Data, datasets)
    re.compile(r"^(Running Dataset|- \w+.*: (Tasks|0\.00|\d))"),  # Ray Data's progress reporting
    WARNING,
    re.compile(r"^:(task|actor)_name:"),  # Ray's markers for its log monitor
    re.compile(r"Token authentication is enabled for this Ray cluster|Progress bars disabled\. To enable"),
]


def draw_bar(line: str, width: int) -> str:
    """A progress line as one line of the terminal's `width`, the eta first and the details cut to fit:
    `[train] step ━━━━━━━━──────────── 120/400 eta 12s loss 3.2 lr 0.001 ...`."""
    match = PROGRESS.match(line)
    if match is None:
        return line[:width]
    rest = match["rest"]
    if eta := re.search(r" eta \S+$", rest):
        rest = eta.group() + rest[: eta.start()]
    head, count = f"[{match['stage']}] {match['label']} ", f" {match['done']}/{match['total']}"
    cells = max(20, min(30, width - len(head) - len(count) - len(rest)))
    filled = cells * int(match["percent"]) // 100
    return (head + "━" * filled + "─" * (cells - filled) + count + rest)[:width]


class _Shown:
    """The lines shown lately, shared by the stdout and stderr filters: Ray forwards some worker lines twice."""

    def __init__(self) -> None:
        self.recent: collections.deque[str] = collections.deque(maxlen=64)

    def seen(self, line: str) -> bool:
        if line in self.recent:
            return True
        self.recent.append(line)
        return False


class _Filter(io.TextIOBase):
    """A text stream that writes every line to `log` and the lines a person needs to `console`."""

    def __init__(self, console: TextIO, log: TextIO, shown: _Shown, bar: "_Bar | None" = None) -> None:
        self.console, self.pending, self.shown, self.after_warning = console, "", shown, False
        self.log: TextIO | None = log
        self.bar = bar

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.log is not None:
            try:
                self.log.write(text)
            except OSError as e:  # a full disk: the console goes on (the exit status and message must still come)
                self.log = None
                self.console.write(f"[run] warning: the log file cannot be written ({e.strerror}); console only\n")
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self._route(line)
        self.pending = self.pending.rsplit("\r", 1)[-1]  # a progress bar redrawn in place: only its last state
        return len(text)

    def close_line(self) -> None:
        if self.pending:
            self._route(self.pending)
            self.pending = ""

    def _route(self, line: str) -> None:
        plain = ANSI.sub("", line)
        forwarded = RAY_PREFIX.match(plain)
        if forwarded:
            plain = plain[forwarded.end():]
        plain = plain.rsplit("\r", 1)[-1]  # a bar redrawn in place (after Ray's prefix): its last state
        after_warning, self.after_warning = self.after_warning, False
        if forwarded:
            if not OURS.match(plain):
                return
        elif not plain.strip() or (after_warning and plain.startswith(" ")):
            return
        elif any(pattern.search(plain) for pattern in NOISE):
            self.after_warning = bool(WARNING.search(plain))
            return
        if forwarded and self.shown.seen(plain):  # a worker line forwarded twice
            return
        if self.bar is not None:
            self.bar.show(plain, self.console)
            return
        self.console.write(plain + "\n")
        self.console.flush()

    def flush(self) -> None:
        if self.log is not None:
            try:
                self.log.flush()
            except OSError:
                self.log = None
        self.console.flush()

    def isatty(self) -> bool:
        return False  # no live progress bars through the filter

    def fileno(self) -> int:
        return self.console.fileno()


class _Bar:
    """On a terminal: progress lines redraw one live bar on the bottom line, other lines print above it, and a bar
    that reaches its total stays as a line of its own."""

    def __init__(self, console: TextIO) -> None:
        self.console, self.current = console, ""

    def show(self, line: str, stream: TextIO) -> None:
        """Draw a progress line, or print `line` to `stream` (stdout or stderr) above the bar."""
        width = shutil.get_terminal_size((100, 24)).columns - 1
        if match := PROGRESS.match(line):
            self.current = draw_bar(line, width)
            self.console.write("\r\x1b[K" + self.current)
            if int(match["done"]) >= int(match["total"]):
                self.finish()
            self.console.flush()
            return
        if self.current:
            self.console.write("\r\x1b[K")
            self.console.flush()
        stream.write(line + "\n")
        stream.flush()
        if self.current:
            self.console.write(self.current)
            self.console.flush()

    def finish(self) -> None:
        """The bar's last state stays, on its own line."""
        if self.current:
            self.console.write("\n")
            self.console.flush()
            self.current = ""


@contextlib.contextmanager
def quiet_console(log_file: Path, verbose: bool = False) -> Iterator[None]:
    """For a stage command: everything to `log_file` (appended), only raygpt's lines to the console."""
    if verbose:
        yield
        return
    log = open_append(log_file)
    with contextlib.closing(_Closing(log)):
        out, err = sys.stdout, sys.stderr
        shown = _Shown()
        bar = _Bar(out) if out.isatty() else None  # both streams draw through it: one bottom line
        sys.stdout, sys.stderr = _Filter(out, log, shown, bar), _Filter(err, log, shown, bar)
        handlers = _redirect_library_loggers({out, err}, sys.stderr, err)
        _quiet_ray_data()
        try:
            yield
        finally:
            for handler, stream in handlers:
                handler.setStream(stream)
            for stream in (sys.stdout, sys.stderr):
                if isinstance(stream, _Filter):
                    stream.close_line()
                    stream.flush()
            if bar is not None:
                bar.finish()
            sys.stdout, sys.stderr = out, err


class _Closing:
    """Closes the log at the end even when its last flush fails (a full disk): the command's own error comes first."""

    def __init__(self, log: TextIO) -> None:
        self.log = log

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.log.close()


def _redirect_library_loggers(streams: set[TextIO], target: TextIO, err: TextIO
                              ) -> list[tuple[logging.StreamHandler, TextIO]]:
    """Point Ray's and DeepSpeed's log handlers (which keep the stream they were created with) at the filter: those on
    the console, and those left on a stream that was closed since (the console of an earlier in-process run)."""
    changed = []
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "DeepSpeed", "deepspeed"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.StreamHandler):
                continue
            if handler.stream in streams:
                changed.append((handler, handler.setStream(target)))
            elif getattr(handler.stream, "closed", False):  # nothing to flush; put back on the console after
                handler.stream = target
                changed.append((handler, err))
    return changed


def _quiet_ray_data() -> None:
    """Ray Data's progress bars off (its summary lines still go to the log through the filter)."""
    try:
        from ray.data import DataContext
    except ImportError:
        return
    DataContext.get_current().enable_progress_bars = False
