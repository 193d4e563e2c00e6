"""Which floating-point precision a device runs fast: one rule for training, decoding, eval and quantization.

    python -m model.precision        # this machine: CPU capability, measured peaks per dtype, what `auto` picks

bf16 halves memory traffic and doubles matmul throughput only where the hardware has it: CUDA GPUs with bf16 support
(Ampere and newer), and CPUs with AVX512_BF16 or AMX. On every other CPU (AVX2 laptops and CI runners, AVX-512
without BF16) PyTorch emulates bf16 matmuls — measured here ~100× slower than fp32 — so `auto` means:

    CUDA, bf16 supported   → bf16          CPU, native bf16   → bf16
    CUDA, no bf16 (V100/T4) → fp16 + loss scaling    any other CPU → fp32

"Native bf16 on this CPU" needs both the capability (PyTorch's dispatch level is AVX-512 or better and oneDNN has
bf16 instructions) and the measurement (a bf16 matmul beats fp32 on this CPU). Inference work picks its device and
dtype here too (`inference_device`, `inference_precision`). Forcing the capability
(`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`) makes an AVX-512 machine take the AVX2 paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch

from model.flops import measured_cpu_peak, measured_cpu_peaks

Precision = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_MIN_SPEEDUP = 1.2
"""bf16 counts as native on a CPU when its measured matmul peak is at least this many times fp32's."""
_VECTOR_LEVELS_WITHOUT_BF16 = ("DEFAULT", "NO AVX", "AVX", "AVX2", "VSX", "Z VECTOR")


@dataclass(frozen=True)
class Hardware:
    """What the precision rule looks at, for one device."""

    device: str
    """"cuda" or "cpu"."""
    name: str
    """The GPU's name, or the CPU's vector capability as PyTorch dispatches it (AVX2, AVX512, …)."""
    cuda_bf16: bool = False
    """CUDA only: the GPU computes in bf16 (compute capability ≥ 8.0)."""
    cpu_bf16_isa: bool = False
    """CPU only: oneDNN has bf16 instructions here (AVX512_BF16 / AMX) at the capability PyTorch dispatches to."""
    peak_fp32: float | None = None
    """CPU only: measured fp32 matmul FLOP/s."""
    peak_bf16: float | None = None
    """CPU only: measured bf16 matmul FLOP/s (measured only when the ISA has bf16; None otherwise)."""

    @property
    def native_bf16(self) -> bool:
        if self.device == "cuda":
            return self.cuda_bf16
        if not self.cpu_bf16_isa or self.peak_bf16 is None or not self.peak_fp32:
            return False
        return self.peak_bf16 >= NATIVE_BF16_MIN_SPEEDUP * self.peak_fp32


@dataclass(frozen=True)
class Choice:
    """The precision a run uses, why, and a warning when an explicit choice is slow here."""

    precision: Literal["fp32", "bf16", "fp16"]
    reason: str
    warning: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def cpu_capability() -> str:
    """PyTorch's CPU dispatch level (honours ATEN_CPU_CAPABILITY)."""
    return torch.backends.cpu.get_cpu_capability()


def _cpu_bf16_isa() -> bool:
    if cpu_capability().upper() in _VECTOR_LEVELS_WITHOUT_BF16:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def detect(device: str | torch.device = "cpu", threads: int | None = None) -> Hardware:
    """The hardware facts of one device (CPU peaks are measured once and cached, see `model.flops`)."""
    return _detect(str(torch.device(device)), threads or torch.get_num_threads())


@cache
def _detect(device_name: str, threads: int) -> Hardware:
    device = torch.device(device_name)
    if device.type == "cuda":
        return Hardware("cuda", torch.cuda.get_device_name(device), cuda_bf16=torch.cuda.is_bf16_supported())
    isa = _cpu_bf16_isa()
    peaks = measured_cpu_peaks((torch.float32, torch.bfloat16) if isa else (torch.float32,), threads)
    return Hardware("cpu", cpu_capability(), cpu_bf16_isa=isa, peak_fp32=peaks[torch.float32],
                    peak_bf16=peaks.get(torch.bfloat16))


def _gflops(x: float | None) -> str:
    return "?" if x is None else f"{x / 1e9:,.1f} GFLOP/s"


def choose(requested: Precision, hw: Hardware) -> Choice:
    """The precision for `requested` on `hw`: `auto` by the rule in the module docstring; an explicit choice is
    kept (fp16 on a CPU is refused) with a warning when bf16 is emulated on this CPU."""
    if hw.device == "cuda":
        if requested == "auto":
            if hw.cuda_bf16:
                return Choice("bf16", f"{hw.name} computes in bf16")
            return Choice("fp16", f"{hw.name} has no bf16: fp16 with dynamic loss scaling")
        if requested == "bf16" and not hw.cuda_bf16:
            raise ValueError(f"precision bf16: {hw.name} does not support bf16; use auto or fp16")
        return Choice(requested, "set in the config")
    if requested == "fp16":
        raise ValueError("precision fp16 needs a GPU; use auto, bf16 or fp32 on CPU")
    peaks = f"matmul fp32 {_gflops(hw.peak_fp32)}, bf16 {_gflops(hw.peak_bf16)}"
    if requested == "auto":
        if hw.native_bf16:
            return Choice("bf16", f"CPU {hw.name} runs bf16 natively ({peaks})")
        why = "has no bf16 instructions" if not hw.cpu_bf16_isa else "runs bf16 no faster than fp32"
        return Choice("fp32", f"CPU {hw.name} {why} ({peaks})")
    if requested == "bf16" and not hw.native_bf16:
        slowdown = emulated_bf16_slowdown()
        return Choice(
            "bf16",
            "set in the config",
            f"bf16 is emulated on this CPU ({hw.name}): a bf16 matmul measured {slowdown:.0f}× slower than fp32; "
            "set precision: auto (or fp32) to train several times faster",
        )
    return Choice(requested, "set in the config")


def emulated_bf16_slowdown(threads: int | None = None) -> float:
    """fp32 peak / bf16 peak on this CPU (a short timed matmul; > 1 means bf16 is slower)."""
    threads = threads or torch.get_num_threads()
    return measured_cpu_peak(torch.float32, threads) / measured_cpu_peak(torch.bfloat16, threads)


def inference_device(use_gpu: bool | None = None) -> torch.device:
    """Where inference work (generate, sample, eval, quantize, serve, the lm-eval adapter) runs: CUDA when it may use
    a GPU (`use_gpu`, e.g. the task reserved one; None: whenever one is visible) and CUDA works here, else the CPU.
    Inside a Ray task CUDA shows only the GPUs the task reserved (CUDA_VISIBLE_DEVICES), so a task without one gets
    the CPU even on a GPU node."""
    if use_gpu is not False and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def inference_precision(device: str | torch.device, requested: Precision = "auto") -> Choice:
    """The dtype inference runs in on `device`. auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPUs
    (decoding and scoring small models on a CPU are not matmul-bound, and fp32 keeps scores and samples the same on
    every CPU kind; ask for bf16 explicitly). An explicit choice follows `choose`, except that fp16 asked for on a
    CPU (a GPU recipe run where there is none) becomes fp32 with a warning instead of an error."""
    device = torch.device(device)
    if device.type == "cpu" and requested in ("auto", "fp16"):
        warning = "fp16 needs a GPU; running in fp32 on this CPU" if requested == "fp16" else None
        return Choice("fp32", "inference on a CPU", warning)
    return choose(requested, detect(device))


def inference_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """Activation dtype for inference kernels that take bf16 or fp32 (the packed int4 kernel): bf16 only where native."""
    return torch.bfloat16 if detect(device).native_bf16 else torch.float32


if __name__ == "__main__":
    hw = detect()
    print(f"CPU capability {hw.name}; bf16 ISA {hw.cpu_bf16_isa}; {torch.get_num_threads()} threads; "
          f"fp32 {_gflops(hw.peak_fp32)}, bf16 {_gflops(hw.peak_bf16)}")
    print(f"precision auto → {choose('auto', hw).precision}: {choose('auto', hw).reason}")
