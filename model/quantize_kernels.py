"""Quantized building blocks: integer codes (int8 rows, asymmetric 4-bit groups, packing), the quantized linear layer
with its CPU kernel choice, and the int8 token embedding. Used by `model.quantize` (which swaps them into a GPT) and
by `model.quantize_calibrate` (GPTQ/AWQ produce the codes).

    python -c "from model.quantize_kernels import rtn_int4; import torch; print(rtn_int4(torch.randn(4, 64), 32)[0])"

Kernels (see `model.quantize` for the formats), chosen per layer on its first call (`QuantLinear.kernel`). No dense
copy of a quantized weight is ever kept: memory stays 8 or 4 bits per weight on every device.
- On a CPU, PyTorch's weight-only kernels, with the activations rounded to bf16 for the call (their fp32 and fp16
  paths are reference loops, 5-20x slower than an fp32 matmul; their bf16 paths are vectorised for AVX2 and AVX-512
  alike, bf16 being only a storage format there): int8 `_weight_int8pack_mm` (per-row scales, the kernel torchao's
  int8 weight-only layout calls on CPU) and 4-bit `_weight_int4pack_mm_for_cpu` (torchao's CPU int4 layout). A
  4-bit layer the int4 kernel does not take (group size not 32/64/128/256, out_features not a multiple of 16)
  dequantizes its weight per call. The kernels' time grows linearly with the rows of a call: at 256 rows (a prefill,
  an evaluation batch) they still beat dequantizing per call, but take 1.4-1.7x a dense fp32 matmul's time with AVX2
  (0.9-1.2x with AVX-512), measured per layer at 768->3072 and 2048->8192 (README, Quantization).
- 4-bit on a CUDA GPU with bf16 activations (compute capability ≥ 8.0): PyTorch's tinygemm kernel
  (`_weight_int4pack_mm`, the one torchao's int4 weight-only layout and gpt-fast call). Its output is checked once
  against the dequantized weight when the layer first packs; a mismatch or an error falls back to dequantizing
  on each call with one warning, so an untested GPU/torch combination is slow rather than wrong.
- Anything else (int8 on a GPU: PyTorch has no CUDA int8 weight-only kernel): the weight dequantized per call.
"""

from __future__ import annotations

from typing import Any

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F



# ----------------------------------------------------------------------------------------------- integer codes
def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) → int8 codes and per-row scale, symmetric: w ≈ q · scale."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.float()


def int4_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit grid of each row of w (rows, cols): scale and integer zero point (0..15)."""
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    return scale, torch.round(-lo / scale).clamp(0, 15)


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.round(w / scale + zero).clamp(0, 15)


def groups_of(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) → (out, in / group_size, group_size)."""
    return w.reshape(w.shape[0], -1, group_size)


def rtn_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes (out, in) 0..15, scale (out, G), zero (out, G))."""
    g = groups_of(w, group_size)  # (out, G, gs)
    scale, zero = int4_params(g.reshape(-1, group_size))
    scale, zero = scale.view(g.shape[:2]), zero.view(g.shape[:2])
    codes = int4_codes(g, scale[..., None], zero[..., None]).reshape(w.shape)
    return codes, scale, zero


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 → (out, in/2) uint8, low nibble first."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(1)


# ----------------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """A linear layer with int8 (per row) or 4-bit (per group) weights; see the module docstring for kernels."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool, input_scale: bool):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.zeros(out_features))
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("input_scale", torch.ones(in_features) if input_scale else None)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.kernel: str | None = None  # which kernel forward uses (see the module docstring), chosen on the first
        self._kernel_for: tuple[torch.device, torch.dtype] | None = None  # call with these activations
        self._packed: Any = None  # that kernel's extra tensors (int8: bf16 scales; int4: packed codes), built once

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, group_size: int, codes: tuple[torch.Tensor, ...] | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Quantize `linear` (RTN unless `codes` = (codes, scale, zero) from GPTQ/AWQ are given)."""
        w = linear.weight.detach().float()
        module = cls(w.shape[1], w.shape[0], bits, group_size, linear.bias is not None, input_scale is not None)
        module.to(w.device)  # calibration may run on a GPU: the new layer lives where the old one did
        if input_scale is not None:
            module.input_scale.copy_(input_scale)
            w = w * input_scale  # x W^T = (x / s)(W s)^T
        if bits == 8:
            module.qweight, module.scales = int8_rows(w)
        else:
            q, scale, zero = codes if codes is not None else rtn_int4(w, group_size)
            module.qweight, module.scales, module.zeros = pack4(q), scale.half(), zero.to(torch.uint8)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach().float())
        return module

    def dequantized(self) -> torch.Tensor:
        """The effective (out, in) float weight, input scale folded back in."""
        w = self.dequantized_codes(torch.float32)
        return w / self.input_scale if self.input_scale is not None else w

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._kernel_for, self._packed = None, None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:  # .to(device): the packed weight is rebuilt there
        self._kernel_for, self._packed = None, None
        return super()._apply(fn, recurse)

    def _choose_kernel(self, x: torch.Tensor) -> str:
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            if self.bits == 8:
                return "int8pack-cpu"
            return "int4pack-cpu" if _int4pack_ok(self, x) else "dequantize"
        if self.bits == 4 and _int4pack_cuda_ok(self, x):
            return "int4pack-cuda"
        return "dequantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) → (..., out)
        if self._kernel_for != (x.device, x.dtype):
            self.kernel, self._kernel_for = self._choose_kernel(x), (x.device, x.dtype)
            self._packed = self._pack(x)
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        rows = x.reshape(-1, self.in_features)  # (N, in)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kernel == "dequantize":
            return F.linear(x, self.dequantized_codes(x.dtype), bias)  # this call's weight, freed after it
        if self.kernel == "int8pack-cpu":
            y = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.qweight, self._packed)
        else:
            y = self._int4_mm(rows, self._packed)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (N, out) bf16 → (..., out)
        return y if bias is None else y + bias

    def _int4_mm(self, rows: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(N, in) → (N, out) bf16 through the chosen int4 kernel and its packed weight."""
        weight, scales_zeros = packed
        op = torch.ops.aten._weight_int4pack_mm_for_cpu if self.kernel == "int4pack-cpu" else torch.ops.aten._weight_int4pack_mm
        return op(rows.to(torch.bfloat16).contiguous(), weight, self.group_size, scales_zeros)

    def _pack(self, x: torch.Tensor) -> Any:
        """The chosen kernel's extra tensors: int8's bf16 scales (the codes are used as they are), int4's packed codes
        and grids. The CUDA int4 kernel is checked against the dequantized weight first."""
        if self.kernel == "int8pack-cpu":
            if self.qweight.data_ptr() % 64:  # the kernel's vector loads crash on codes not 16-byte aligned (a view
                self.qweight = self.qweight.clone()  # into a file's memory, a slice); a clone is allocator-aligned
            return self.scales.to(torch.bfloat16)
        if self.kernel == "int4pack-cpu":
            return self._int4pack(cuda=False)
        if self.kernel == "int4pack-cuda":
            return self._checked_cuda_int4pack(x.device)
        return None

    def _checked_cuda_int4pack(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The CUDA int4 weight, if the kernel computes our weight on a seeded probe; else one warning, the
        dequantizing kernel, and None."""
        try:
            packed = self._int4pack(cuda=True)
            seeded = torch.Generator(device).manual_seed(0)  # not the global RNG: sampling stays reproducible
            probe = torch.randn(8, self.in_features, device=device, dtype=torch.bfloat16, generator=seeded)
            got = self._int4_mm(probe, packed).float()
            want = (probe @ self.dequantized_codes(torch.bfloat16).T).float()
            error = ((got - want).norm() / want.norm().clamp(min=1e-6)).item()
            if error < 2e-2:
                return packed
            reason = f"its output differs from the dequantized weight's by {error:.1%}"
        except RuntimeError as e:
            reason = str(e).splitlines()[0][:120]
        _warn_once(f"4-bit CUDA kernel _weight_int4pack_mm not used ({reason}); dequantizing per call instead")
        self.kernel = "dequantize"
        return None

    def dequantized_codes(self, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) weight in `dtype`, without the input scale (forward divides the input by it)."""
        if self.bits == 8:
            return self.qweight.to(dtype) * self.scales[:, None].to(dtype)
        codes = groups_of(unpack4(self.qweight).to(dtype), self.group_size)
        return ((codes - self.zeros[..., None].to(dtype)) * self.scales[..., None].to(dtype)).flatten(1)

    def _int4pack(self, cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and grids in the layout of PyTorch's int4 kernels, which compute w = (q - 8)·scale + zp: zp =
        scale·(8 - zero) gives our (q - zero)·scale. The CPU kernel packs (out, in) int32 codes; the CUDA one takes
        (out, in/2) uint8 with the even column in the high nibble (as torchao packs for it), tiled for 8 inner
        k-tiles. → (packed weight, scales_and_zeros (G, out, 2) bf16)."""
        codes = unpack4(self.qweight).to(torch.int32)  # (out, in) 0..15
        if cuda:
            nibbles = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # (out, in/2)
            weight = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), 8)
        else:
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)  # inner k-tiles: CUDA's argument
        scale = self.scales.float()
        scales_zeros = torch.stack([scale, scale * (8 - self.zeros.float())], dim=-1)  # (out, G, 2)
        return weight, scales_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)


def _int4pack_ok(module: QuantLinear, x: torch.Tensor) -> bool:
    """Whether PyTorch's packed int4 CPU kernel takes this layer and input (its shape limits, checked up front)."""
    return (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and module.group_size in (32, 64, 128, 256)
        and module.out_features % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    )


def _int4pack_cuda_ok(module: QuantLinear, x: torch.Tensor) -> bool:
    """Whether PyTorch's tinygemm int4 CUDA kernel takes this layer and input: bf16 activations on a GPU of compute
    capability ≥ 8.0, group size 32..256, in_features a multiple of 128 (8 inner k-tiles × 16) and out_features of 8."""
    return (
        x.device.type == "cuda" and x.dtype == torch.bfloat16 and module.group_size in (32, 64, 128, 256)
        and module.in_features % 128 == 0 and module.out_features % 8 == 0
        and hasattr(torch.ops.aten, "_weight_int4pack_mm") and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class QuantEmbedding(nn.Module):
    """Token embedding with int8 rows; with tied embeddings it reads the output head's QuantLinear buffers."""

    def __init__(self, head: QuantLinear | None, num: int = 0, dim: int = 0):
        super().__init__()
        self.head = [head]  # a list: not a submodule, so the tied tensors are saved once (under lm_head)
        self.out_dtype = torch.float32  # the model's activation dtype (`model.quantize.set_activation_dtype`)
        if head is None:
            self.register_buffer("qweight", torch.zeros(num, dim, dtype=torch.int8))
            self.register_buffer("scales", torch.zeros(num))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, head: QuantLinear | None) -> QuantEmbedding:
        if head is not None:
            return cls(head)
        module = cls(None)
        module.qweight, module.scales = int8_rows(emb.weight.detach().float())
        return module

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, T, C)
        source = self.head[0] if self.head[0] is not None else self
        return (source.qweight[idx].float() * source.scales[idx][..., None]).to(self.out_dtype)


# ----------------------------------------------------------------------------------------------- model surgery


def group_size_for(in_features: int, group_size: int) -> int:
    """The configured group size, or the whole row when it does not divide the input width."""
    return group_size if in_features % group_size == 0 else in_features
