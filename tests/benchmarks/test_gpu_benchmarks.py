"""The GPU benchmarks: on a machine without a GPU they exit with one line; the inference one runs its whole path on
a CPU when asked (a smoke test of the code, not a figure)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the benchmarks would run")
@pytest.mark.parametrize("script", ["gpu_train.py", "gpu_infer.py"])
def test_without_a_gpu_they_exit_with_one_line(script: str) -> None:
    done = subprocess.run([sys.executable, f"benchmarks/{script}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"benchmarks/{script}: no CUDA GPU on this machine; nothing measured"


def test_the_inference_benchmark_runs_every_variant_through_the_batching_engine() -> None:
    argv = [sys.executable, "benchmarks/gpu_infer.py", "--device", "cpu", "--preset", "debug", "--tokens", "6"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    for variant in ("fp32", "fp16", "bf16", "bnb-int8", "bnb-nf4", "int8", "int4-rtn", "gptq"):
        assert variant in rows, done.stdout
    assert "| 1.00 | 6/6 | - |" in rows["fp32"]  # its own reference
    for variant in ("bf16", "int8", "int4-rtn", "gptq"):
        assert "fails:" not in rows[variant], rows[variant]
    cells = [c.strip() for c in rows["gptq"].split("|")]
    assert float(cells[7]) > 0 and set(cells[6].split(", ")) <= {"int8pack-cpu", "int4pack-cpu", "dequantize"}  # calibrated, a kernel
