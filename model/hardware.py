"""GPUs as data: memory and dense tensor-core peaks, for MFU (model/flops.py) and sizing runs on paper (`raygpt plan`).

    python -c "from model.hardware import GPUS; print(GPUS['h100'])"

No torch here: `raygpt plan` answers without loading the training stack. Peaks are the vendors' dense (no sparsity)
figures; memory is what `nvidia-smi` reports as total for the card.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Gpu:
    """One GPU model."""

    name: str
    match: str
    """A substring of `torch.cuda.get_device_name()` that identifies it (the longest matching one wins)."""
    memory: int
    """Bytes of device memory."""
    peak: dict[str, float]
    """Dense FLOP/s by precision ("bf16", "fp16", "fp32"); no bf16 entry where the GPU has none."""


GPUS: dict[str, Gpu] = {
    "h200": Gpu("H200 SXM 141GB", "H200", 143_771 << 20, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    "h100": Gpu("H100 SXM 80GB", "H100", 81_559 << 20, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    "h100-pcie": Gpu("H100 PCIe 80GB", "H100 PCIe", 81_559 << 20, {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    "a100-80g": Gpu("A100 80GB", "A100", 81_920 << 20, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    "a100-40g": Gpu("A100 40GB", "A100-SXM4-40GB", 40_960 << 20, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    "l40s": Gpu("L40S 48GB", "L40S", 46_068 << 20, {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    "l4": Gpu("L4 24GB", "L4", 23_034 << 20, {"bf16": 121e12, "fp16": 121e12, "fp32": 30e12}),
    "a10g": Gpu("A10G 24GB", "A10G", 23_028 << 20, {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    "v100": Gpu("V100 32GB", "V100", 32_768 << 20, {"fp16": 125e12, "fp32": 15.7e12}),
    "t4": Gpu("T4 16GB", "T4", 15_360 << 20, {"fp16": 65e12, "fp32": 8.1e12}),
}


def gpu_named(device_name: str) -> Gpu | None:
    """The table's entry for a CUDA device name ("NVIDIA H100 80GB HBM3"), or None for an unknown GPU."""
    matches = [gpu for gpu in GPUS.values() if gpu.match in device_name]
    return max(matches, key=lambda gpu: len(gpu.match)) if matches else None
