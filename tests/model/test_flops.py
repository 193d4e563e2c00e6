"""MFU is right on every CPU: the peak it is divided by is the rate of the model's own matmuls as training runs them
(dtype, shapes, forward and backward), and a value above 1 is reported as a bug of the peak, never as a number."""

from __future__ import annotations

import time

import pytest
import torch

from model.config import ModelConfig
from model.flops import checked_mfu, flops_per_token, matmul_shapes, training_peak
from model.gpt import GPT

pytestmark = pytest.mark.kernels  # CI runs these again with the CPU ISA forced to AVX2


def test_an_mfu_above_one_is_none_with_a_warning_naming_both_rates() -> None:
    value, warning = checked_mfu(tokens_per_sec=1000, flops_per_tok=3e6, peak_per_device=1.5e9)
    assert value is None and warning is not None
    assert "MFU 2.00 is above 1" in warning and "3.0 GFLOP/s" in warning and "1.5 GFLOP/s" in warning
    assert checked_mfu(1000, 3e6, 6e9) == (0.5, None)
    assert checked_mfu(1000, 3e6, None) == (None, None)  # unknown peak: no guess


def test_the_shapes_are_the_models_matmuls() -> None:
    cfg = ModelConfig.preset("gpt2-124m", vocab_size=50304)
    assert matmul_shapes(cfg) == [(768, 768), (768, 2304), (768, 3072), (768, 50304), (3072, 768)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_never_beats_the_measured_peak(dtype: torch.dtype) -> None:
    """The real model's forward and backward in `dtype` (what a DeepSpeed worker runs) achieves less than the peak of
    its matmuls: MFU < 1 in either dtype, on whatever kernels this CPU (or a forced ISA) dispatches to."""
    cfg = ModelConfig.preset("debug", vocab_size=512, block_size=64)
    peak = training_peak(cfg, dtype, torch.get_num_threads())
    model = GPT(cfg).to(dtype)
    x = torch.randint(0, 512, (8, 64))
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        logits, loss = model(x, x)
        loss.backward()
        best = min(best, time.perf_counter() - start)
    achieved = 8 * 64 * flops_per_token(cfg, 64) / best
    assert 0 < achieved / peak < 1, f"achieved {achieved / 1e9:.2f} GFLOP/s, peak {peak / 1e9:.2f}"
