"""The precision rule (`model.precision`): bf16 only where it is native, fp16 on GPUs without bf16, fp32 otherwise;
explicit bf16 on an emulating CPU warns with the measured slowdown. The rule is tested on described hardware (so
both kinds of CPU are covered on either), and `detect` on this machine with the capability forced to AVX2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from model.precision import Hardware, choose, detect

pytestmark = pytest.mark.kernels  # CI runs these again with the CPU ISA forced to AVX2

AVX2 = Hardware("cpu", "AVX2", cpu_bf16_isa=False, peak_fp32=110e9, peak_bf16=None)
AVX512_NO_BF16 = Hardware("cpu", "AVX512", cpu_bf16_isa=True, peak_fp32=200e9, peak_bf16=150e9)  # Skylake: emulated
AMX = Hardware("cpu", "AVX512", cpu_bf16_isa=True, peak_fp32=220e9, peak_bf16=650e9)
H100 = Hardware("cuda", "NVIDIA H100 80GB HBM3", cuda_bf16=True)
V100 = Hardware("cuda", "Tesla V100-SXM2-16GB", cuda_bf16=False)


@pytest.mark.parametrize(
    ("hw", "expected"), [(AVX2, "fp32"), (AVX512_NO_BF16, "fp32"), (AMX, "bf16"), (H100, "bf16"), (V100, "fp16")]
)
def test_auto_picks_the_native_precision(hw: Hardware, expected: str) -> None:
    choice = choose("auto", hw)
    assert choice.precision == expected and choice.warning is None
    assert hw.name.split()[0] in choice.reason  # the reason names the hardware it was decided on


def test_explicit_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    import model.precision as precision

    monkeypatch.setattr(precision, "emulated_bf16_slowdown", lambda threads=None: 95.0)
    slow = choose("bf16", AVX2)
    assert slow.precision == "bf16" and "emulated" in slow.warning and "95× slower" in slow.warning
    assert choose("bf16", AMX).warning is None and choose("fp32", AMX).precision == "fp32"
    assert choose("fp16", V100).precision == "fp16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        choose("fp16", AVX2)
    with pytest.raises(ValueError, match="does not support bf16"):
        choose("bf16", V100)


def _detect_in_subprocess(env: dict[str, str]) -> str:
    code = "from model.precision import detect, choose; h = detect(); print(h.name, h.cpu_bf16_isa, choose('auto', h).precision)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_forcing_avx2_takes_the_fp32_path() -> None:
    """An AVX-512 machine forced to AVX2 (PyTorch's dispatch and oneDNN's ISA) reports no bf16 and picks fp32."""
    assert _detect_in_subprocess({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}) == "AVX2 False fp32"


def test_this_machine_is_consistent() -> None:
    hw = detect()
    assert hw.peak_fp32 and hw.peak_fp32 > 1e9
    assert choose("auto", hw).precision == ("bf16" if hw.native_bf16 else "fp32")
    if hw.peak_bf16 is not None:  # measured only where the ISA has bf16
        assert hw.cpu_bf16_isa


def test_inference_runs_on_the_gpu_only_when_the_task_may_and_can(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from model import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [precision.inference_device(x).type for x in (None, True, False)] == ["cpu", "cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a task that reserved a GPU sees one
    assert [precision.inference_device(x).type for x in (None, True, False)] == ["cuda", "cuda", "cpu"]


@pytest.mark.parametrize(
    ("device", "gpu_bf16", "requested", "expected", "warns"),
    [
        ("cpu", False, "auto", "fp32", False),
        ("cpu", False, "fp16", "fp32", True),  # a GPU recipe evaluated on a CPU: fp32, said once
        ("cpu", False, "fp32", "fp32", False),
        ("cuda", True, "auto", "bf16", False),  # A100 / H100
        ("cuda", False, "auto", "fp16", False),  # V100 / T4
        ("cuda", True, "fp32", "fp32", False),
        ("cuda", False, "fp16", "fp16", False),
    ],
)
def test_inference_precision_rules(monkeypatch: pytest.MonkeyPatch, device: str, gpu_bf16: bool, requested: str,
                                   expected: str, warns: bool) -> None:
    from model import precision

    monkeypatch.setattr(precision, "detect", lambda d: Hardware("cuda", "GPU", cuda_bf16=gpu_bf16))
    choice = precision.inference_precision(device, requested)  # type: ignore[arg-type]
    assert choice.precision == expected and (choice.warning is not None) == warns


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from model import precision

    monkeypatch.setattr(precision, "detect", lambda d: Hardware("cuda", "Tesla V100", cuda_bf16=False))
    with pytest.raises(ValueError, match="Tesla V100 does not support bf16"):
        precision.inference_precision("cuda", "bf16")


def test_load_for_inference_puts_the_model_where_and_how_the_rule_says(checkpoint) -> None:  # noqa: ANN001
    import torch

    from model.checkpoint import load_for_inference

    loaded, choice = load_for_inference(checkpoint, use_gpu=False)
    assert choice.precision == "fp32" and {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    loaded, choice = load_for_inference(checkpoint, use_gpu=False, precision="bf16")
    assert choice.precision == "bf16" and {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
