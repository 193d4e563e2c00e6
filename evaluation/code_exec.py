"""Runs model-written programs for code benchmarks (HumanEval), each in its own sandboxed subprocess.

    raygpt eval CONFIG eval.tasks=[humaneval] eval.allow_code_execution=true

Used as the `pass_at_k` metric of raygpt's humaneval task instead of lm-eval's, which loads Hugging Face `evaluate`'s
"code_eval" from the hub at import time (fails offline) and executes programs with `exec` in forked workers of the
evaluating process. Here every program is a separate `python -I` process in an empty temporary directory, with a
wall-clock timeout, CPU-time, address-space and file-size limits, its own session (the whole process group is killed
on timeout), no stdin and a minimal environment. Nothing runs unless RAYGPT_ALLOW_CODE_EXECUTION=1, which `raygpt
eval` sets only when `eval.allow_code_execution=true`.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from math import comb
from pathlib import Path

ALLOW_ENV = "RAYGPT_ALLOW_CODE_EXECUTION"
TIMEOUT_ENV, MEMORY_ENV = "RAYGPT_CODE_TIMEOUT_S", "RAYGPT_CODE_MEMORY_MB"


class CodeExecutionDisabled(RuntimeError):
    """Model-written code was about to run without the explicit opt-in."""


def _limits(cpu_s: int, memory_mb: int) -> None:
    """In the child, before exec: caps on CPU time, address space, written file size; no core dumps."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, 10 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(program: str, timeout_s: float | None = None, memory_mb: int | None = None) -> tuple[bool, str]:
    """(passed, reason): passed means exit status 0 within the limits."""
    if os.environ.get(ALLOW_ENV) != "1":
        raise CodeExecutionDisabled(f"refusing to run model-written code: set eval.allow_code_execution=true ({ALLOW_ENV}=1)")
    timeout_s = timeout_s or float(os.environ.get(TIMEOUT_ENV, "10"))
    memory_mb = memory_mb or int(os.environ.get(MEMORY_ENV, "1024"))
    with tempfile.TemporaryDirectory(prefix="raygpt-exec-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", str(path)], cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"}, start_new_session=True,
            preexec_fn=lambda: _limits(int(timeout_s) + 1, memory_mb),
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False, "timed out"
    if proc.returncode == 0:
        return True, "passed"
    lines = err.decode(errors="replace").strip().splitlines()
    return False, lines[-1] if lines else f"exit status {proc.returncode}"


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int | None = None) -> dict[str, float]:
    """lm-eval metric: references are test programs, predictions the candidate programs per problem."""
    ks = [k] if isinstance(k, int) else list(k or [1])
    scores = {f"pass@{kk}": 0.0 for kk in ks}
    for test, candidates in zip(references, predictions):
        correct = sum(run_program(f"{candidate}\n\n{test}\n")[0] for candidate in candidates)
        for kk in ks:
            scores[f"pass@{kk}"] += pass_at_k_estimate(len(candidates), correct, kk) / len(references)
    return scores


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter: the prompt (function signature and docstring) followed by each completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]
