"""Quantized building blocks: integer codes (int8 rows, asymmetric 4-bit groups, packing), the quantized linear layer
with its CPU kernel choice, and the int8 token embedding. Used by `model.quantize` (which swaps them into a GPT) and
by `model.quantize_calibrate` (GPTQ/AWQ produce the codes).

    python -c "from model.quantize_kernels import rtn_int4; import torch; print(rtn_int4(torch.randn(4, 64), 32)[0])"

Kernels (see `model.quantize` for the formats): int8 uses PyTorch's fbgemm dynamic int8 matmul on x86 CPUs; 4-bit
uses the packed int4 CPU kernel where bf16 is native, a cached dense fp32 weight where bf16 is emulated, and an
on-the-fly dequantized weight elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.precision import inference_dtype


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
        self._packed: Any = None  # the CPU kernel's weight (fbgemm int8 / int4pack / fp32), built on first use

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, group_size: int, codes: tuple[torch.Tensor, ...] | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Quantize `linear` (RTN unless `codes` = (codes, scale, zero) from GPTQ/AWQ are given)."""
        w = linear.weight.detach().float()
        module = cls(w.shape[1], w.shape[0], bits, group_size, linear.bias is not None, input_scale is not None)
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
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) → (..., out)
        if self.bits == 4 and _dense_fp32_ok(x):  # no native bf16: a dense fp32 weight beats the int4 kernel
            if self._packed is None:
                self._packed = self.dequantized()  # the input scale folded in: no per-call division
            return F.linear(x, self._packed, self.bias)
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if self.bits == 8 and _fbgemm_ok(x):
            if self._packed is None:
                qw = torch._make_per_channel_quantized_tensor(
                    self.qweight, self.scales.double(), torch.zeros_like(self.scales, dtype=torch.long), 0
                )
                self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features), self._packed, True)
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.bits == 4 and _int4pack_ok(self, x):
            if self._packed is None:
                self._packed = self._int4pack()
            weight, scales_zeros = self._packed
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(), weight, self.group_size, scales_zeros
            ).to(x.dtype)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_codes(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dequantized_codes(self, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) weight in `dtype`, without the input scale (forward divides the input by it)."""
        if self.bits == 8:
            return self.qweight.to(dtype) * self.scales[:, None].to(dtype)
        codes = groups_of(unpack4(self.qweight).to(dtype), self.group_size)
        return ((codes - self.zeros[..., None].to(dtype)) * self.scales[..., None].to(dtype)).flatten(1)

    def _int4pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and grids in the layout of `_weight_int4pack_mm_for_cpu`, which computes w = (q - 8)·scale + zp:
        zp = scale·(8 - zero) gives our (q - zero)·scale. → (packed weight, scales_and_zeros (G, out, 2) bf16)."""
        codes = unpack4(self.qweight).to(torch.int32)  # (out, in) 0..15
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


def _dense_fp32_ok(x: torch.Tensor) -> bool:
    """fp32 activations on a CPU where bf16 is emulated (the packed int4 kernel needs bf16 to be fast)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and inference_dtype("cpu") == torch.float32


def _fbgemm_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and "fbgemm" in torch.backends.quantized.supported_engines


class QuantEmbedding(nn.Module):
    """Token embedding with int8 rows; with tied embeddings it reads the output head's QuantLinear buffers."""

    def __init__(self, head: QuantLinear | None, num: int = 0, dim: int = 0):
        super().__init__()
        self.head = [head]  # a list: not a submodule, so the tied tensors are saved once (under lm_head)
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
        return source.qweight[idx].float() * source.scales[idx][..., None]


# ----------------------------------------------------------------------------------------------- model surgery


def group_size_for(in_features: int, group_size: int) -> int:
    """The configured group size, or the whole row when it does not divide the input width."""
    return group_size if in_features % group_size == 0 else in_features
