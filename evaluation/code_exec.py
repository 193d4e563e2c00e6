"""Runs model-written programs (HumanEval, MBPP, ...) in a sandbox: one program, one sandbox, fail-closed.

    raygpt eval CONFIG eval.tasks=[humaneval,mbpp] eval.allow_code_execution=true
    python -m evaluation.code_exec check      # is the sandbox usable on this node? (one line)

lm-eval's code tasks score programs with Hugging Face evaluate's "code_eval", which `exec`s them in forked workers of
the evaluating process (its environment, files, network and the node's credentials in reach). raygpt hands those
tasks `SandboxedCodeEval` instead (`code_eval_in_sandbox`): the same `compute()` contract, but every program runs in
its own sandbox:

- `bwrap` (bubblewrap, the default; `make install` and the cluster image install it): new user, pid, network, ipc,
  uts and cgroup namespaces; a read-only root in which the program sees only /usr (read-only), a fresh /proc of its
  own pid namespace, a minimal read-only /dev and three small empty tmpfs (/work, its cwd, /tmp and /dev/shm); no
  network at all (not even the host's loopback); uid 65534 inside and, when the evaluator is root, also outside (so
  process limits bind); no environment; no capabilities; no new user namespaces; no kernel keyrings (seccomp). rlimits
  cap CPU time, address space, file size, open files and processes, and the process tree's memory is capped as a
  whole: by a cgroup of its own where the node allows one, else by fewer processes (evaluation/confine.py).
- `subprocess` (explicitly weaker, `eval.sandbox: subprocess`): the same limits, environment and output caps, but no
  namespaces: the program runs as the evaluator's user and can read what it can read and reach the network.

Both: stdout is discarded and only the last 4 KiB of stderr are kept (however much the program writes), and on the
deadline the whole tree is killed (with bwrap the pid namespace dies with it, detached children included) and
waited for at most `KILL_WAIT_S`. Nothing runs unless RAYGPT_ALLOW_CODE_EXECUTION=1, which `raygpt eval` sets only
with `eval.allow_code_execution=true`; a missing or unusable backend is one line (`CodeExecutionRefused`), never a
silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from math import comb
from typing import Any, Literal

from evaluation import confine

Backend = Literal["bwrap", "subprocess"]
BACKENDS: tuple[Backend, ...] = ("bwrap", "subprocess")
ALLOW_ENV, BACKEND_ENV, PYTHON_ENV = "RAYGPT_ALLOW_CODE_EXECUTION", "RAYGPT_CODE_SANDBOX", "RAYGPT_SANDBOX_PYTHON"
TIMEOUT_ENV, MEMORY_ENV = "RAYGPT_CODE_TIMEOUT_S", "RAYGPT_CODE_MEMORY_MB"
DEFAULT_PYTHON = "/usr/bin/python3"  # a system interpreter: only /usr is visible inside the sandbox
NOBODY = 65534
KEEP_STDERR = 4096  # bytes of stderr kept for the verdict's reason
KILL_WAIT_S = 2.0  # after SIGKILL, how long to wait for the tree to be gone
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class CodeExecutionRefused(RuntimeError):
    """Model-written code was about to run without the opt-in, or without a usable sandbox; one line."""


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout_s: float = 10.0
    """Wall clock, from start to verdict (the CPU-time limit is this, rounded up, plus 1 s)."""
    memory_mb: int = 1024
    """Address space of each process."""
    processes: int = 32
    """Processes and threads of the sandbox's user (bwrap: inside its own user namespace)."""
    file_mb: int = 16
    """Largest file it may write, and the size of each of its tmpfs (bwrap)."""
    open_files: int = 64
    """Open file descriptors per process."""

    @classmethod
    def from_env(cls) -> Limits:
        return cls(timeout_s=float(os.environ.get(TIMEOUT_ENV, cls.timeout_s)),
                   memory_mb=int(os.environ.get(MEMORY_ENV, cls.memory_mb)))

    def rlimits(self) -> dict[str, int]:
        return {
            "RLIMIT_CPU": int(self.timeout_s) + 2, "RLIMIT_AS": self.memory_mb << 20, "RLIMIT_FSIZE": self.file_mb << 20,
            "RLIMIT_NPROC": self.processes, "RLIMIT_NOFILE": self.open_files, "RLIMIT_CORE": 0,
        }


def _launcher(limits: Limits, program: str) -> str:
    """Python source run by the sandbox's interpreter: set the rlimits (soft = hard, so they cannot be raised), then
    become the program. Set here, inside the sandbox, so that they count only the sandbox's own processes."""
    return (
        "import os, resource, sys\n"
        f"for name, value in {limits.rlimits()!r}.items():\n"
        "    resource.setrlimit(getattr(resource, name), (value, value))\n"
        f"os.execv(sys.executable, [sys.executable, '-I', {program!r}])\n"
    )


def _system_mounts() -> list[str]:
    """bwrap arguments exposing the system's /usr (and its /bin, /lib, ... symlinks or folders) read-only."""
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _bwrap_argv(bwrap: str, python: str, limits: Limits, program_fd: int, seccomp_fd: int | None) -> list[str]:
    size = str(limits.file_mb << 20)
    return [
        bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
        "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox", "--cap-drop", "ALL",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/work", "--setenv", "PYTHONHASHSEED", "0",
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),  # no keyrings (evaluation/confine.py)
        *_system_mounts(), "--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm",
        "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/work",
        "--ro-bind-data", str(program_fd), "/sandbox/program.py", "--remount-ro", "/dev", "--remount-ro", "/",
        "--chdir", "/work", python, "-I", "-c", _launcher(limits, "/sandbox/program.py"),
    ]


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@functools.cache
def check_backend(backend: Backend, python: str) -> None:
    """Raise CodeExecutionRefused (one line) unless `backend` can run a program here; checked once per process by
    running one."""
    if backend not in BACKENDS:
        raise CodeExecutionRefused(f"eval.sandbox: unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    if not os.access(python, os.X_OK):
        raise CodeExecutionRefused(f"eval.sandbox_python: {python} is not an executable interpreter on this node")
    if backend == "bwrap" and shutil.which("bwrap") is None:
        raise CodeExecutionRefused(
            "refusing to run model-written code: bubblewrap (bwrap) is not installed on this node "
            "(apt-get install bubblewrap; `make install` and the cluster image do), or set eval.sandbox=subprocess "
            "to accept a weaker sandbox")
    verdict = _run("print('ok')", Limits(timeout_s=10), backend, python)
    if not verdict.passed:
        raise CodeExecutionRefused(f"refusing to run model-written code: the {backend} sandbox does not work on this "
                                   f"node ({verdict.reason})")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    seconds: float


def _drain(stream: Any, deadline: float) -> tuple[bytes, bool]:
    """Read `stream` to EOF or the deadline, keeping only the last KEEP_STDERR bytes: (tail, reached EOF)."""
    tail = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(stream.fileno(), 1 << 16)
            if not chunk:
                return tail, True
            tail = (tail + chunk)[-KEEP_STDERR:]
    return tail, False


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its whole session; with bwrap, the pid namespace dies with its init


def memory_bound(limits: Limits, cgroup: bool) -> tuple[Limits, str]:
    """The limits a program runs under, and the sentence saying how its memory is bounded as a whole: by its own
    cgroup, or by fewer processes each with a share of the cap (their product stays under it)."""
    if cgroup:
        return limits, f"a cgroup caps each program's process tree at {limits.memory_mb} MiB"
    processes = min(limits.processes, confine.FALLBACK_PROCESSES)
    shared = replace(limits, processes=processes, memory_mb=limits.memory_mb // processes)
    return shared, (f"no memory cgroup on this node: at most {processes} processes of {shared.memory_mb} MiB each "
                    f"({limits.memory_mb} MiB in all)")


def _run(program: str, limits: Limits, backend: Backend, python: str) -> Verdict:
    started = time.monotonic()
    deadline = started + limits.timeout_s
    fd = _memfd("raygpt-program", program.encode())  # the program reaches the sandbox as a copy, never a host path
    bpf = confine.keyring_filter() if backend == "bwrap" else None
    seccomp = _memfd("raygpt-seccomp", bpf) if bpf is not None else None
    try:
        with tempfile.TemporaryDirectory(prefix="raygpt-exec-") as tmp, \
                confine.program_cgroup(limits.memory_mb << 20) as procs:  # the subprocess backend's cwd; the cgroup
            limits = memory_bound(limits, procs is not None)[0]
            if backend == "bwrap":
                argv, cwd = _bwrap_argv(shutil.which("bwrap") or "bwrap", python, limits, fd, seccomp), "/"
            else:
                argv, cwd = [python, "-I", "-c", _launcher(limits, f"/dev/fd/{fd}")], tmp
            as_nobody = backend == "bwrap" and os.geteuid() == 0  # root is exempt from RLIMIT_NPROC: drop it first
            if procs is not None or as_nobody:  # join the cgroup, then drop root, then become the sandbox
                entry = confine.enter_and_drop(str(procs) if procs else None, NOBODY if as_nobody else None)
                argv = [sys.executable, "-I", "-c", entry, *argv]
            proc = subprocess.Popen(
                argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"}, start_new_session=True,
                pass_fds=(fd,) if seccomp is None else (fd, seccomp),
            )
            assert proc.stderr is not None
            try:
                tail, eof = _drain(proc.stderr, deadline)
                try:
                    status = proc.wait(timeout=max(0.0, deadline - time.monotonic())) if eof else None
                except subprocess.TimeoutExpired:
                    status = None
            finally:
                _kill(proc)  # also what a passing program left behind (subprocess backend: its process group)
                _drain(proc.stderr, time.monotonic() + KILL_WAIT_S)  # EOF: every process holding the pipe is gone
                proc.stderr.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=KILL_WAIT_S)
    finally:
        os.close(fd)
        if seccomp is not None:
            os.close(seccomp)
    seconds = time.monotonic() - started
    if status is None:
        return Verdict(False, "timed out", seconds)
    if status == 0:
        return Verdict(True, "passed", seconds)
    lines = tail.decode(errors="replace").strip().splitlines()
    return Verdict(False, lines[-1][-200:] if lines else f"exit status {status}", seconds)


def settings() -> tuple[Backend, str]:
    """(backend, interpreter) from the environment `raygpt eval` gives its tasks."""
    backend = os.environ.get(BACKEND_ENV, "bwrap")
    return backend, os.environ.get(PYTHON_ENV, DEFAULT_PYTHON)  # type: ignore[return-value]


def run_program(program: str, limits: Limits | None = None) -> Verdict:
    """Run one program in the configured sandbox; passed means exit status 0 within the limits."""
    if os.environ.get(ALLOW_ENV) != "1":
        raise CodeExecutionRefused(f"refusing to run model-written code: set eval.allow_code_execution=true ({ALLOW_ENV}=1)")
    backend, python = settings()
    check_backend(backend, python)
    return _run(program, limits or Limits.from_env(), backend, python)


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


class SandboxedCodeEval:
    """Stands in for `evaluate.load("code_eval")` in lm-eval's code tasks: the same `compute()` arguments and result,
    each candidate + test program run by `run_program`. Their `timeout` is ignored: `eval.code_timeout_s` applies."""

    def compute(self, references: list[str], predictions: list[list[str]], k: list[int] | int = (1, 10, 100),
                num_workers: int = 4, timeout: float = 3.0) -> tuple[dict[str, float], dict[int, list]]:
        ks = [k] if isinstance(k, int) else list(k)
        programs = [(i, f"{candidate}\n{test}") for i, (test, candidates) in enumerate(zip(references, predictions))
                    for candidate in candidates]
        with ThreadPoolExecutor(max(1, min(num_workers, os.cpu_count() or 1))) as pool:
            verdicts = list(pool.map(lambda p: run_program(p[1]), programs))
        results: dict[int, list] = {i: [] for i in range(len(references))}
        for (i, _), verdict in zip(programs, verdicts):
            results[i].append((len(results[i]), {"passed": verdict.passed, "result": verdict.reason}))
        scores = {}
        for kk in ks:
            if all(len(c) >= kk for c in predictions):
                per_problem = [pass_at_k_estimate(len(r), sum(v["passed"] for _, v in r), kk) for r in results.values()]
                scores[f"pass@{kk}"] = sum(per_problem) / max(1, len(per_problem))
        return scores, results


@contextlib.contextmanager
def code_eval_in_sandbox() -> Iterator[None]:
    """While active, `evaluate.load("code_eval")` (what lm-eval's humaneval*, mbpp* and humaneval_*infilling tasks
    call, at import of their utils) returns `SandboxedCodeEval`; every other metric loads as usual. Replacing the
    library's executor is the point: it would run the programs inside this process."""
    import evaluate

    original = evaluate.load

    def load(path: str, *args: Any, **kwargs: Any) -> Any:
        return SandboxedCodeEval() if path == "code_eval" else original(path, *args, **kwargs)

    evaluate.load = load
    try:
        yield
    finally:
        evaluate.load = original


def main(argv: list[str]) -> int:
    if argv[:1] != ["check"]:
        print("usage: python -m evaluation.code_exec check [bwrap|subprocess] [PYTHON]", file=sys.stderr)
        return 2
    backend = argv[1] if len(argv) > 1 else "bwrap"
    python = argv[2] if len(argv) > 2 else DEFAULT_PYTHON
    try:
        check_backend(backend, python)  # type: ignore[arg-type]
    except CodeExecutionRefused as e:
        print(e, file=sys.stderr)
        return 1
    print(f"the {backend} sandbox works on this node ({python}); memory: "
          f"{memory_bound(Limits.from_env(), confine.memory_cgroups())[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
