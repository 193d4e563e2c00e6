"""Post-training quantization of a GPT: int8, 4-bit RTN / GPTQ / AWQ, and bitsandbytes int8 / NF4.

    raygpt quantize configs/demo.yaml                       # every configured method, as Ray tasks
    python -c "from model.checkpoint import load_checkpoint; load_checkpoint('runs/demo/quantized/gptq')"

What is quantized: every linear layer of the transformer blocks (attention qkv/proj, MLP up/gate/down) with the
method, and the token embedding / output head to int8 per row in every method (with tied embeddings they are one
int8 tensor). Norms, biases and learned positions stay fp32.

Formats (safetensors, loaded back by `model.checkpoint.load_checkpoint`, so generate/eval/export-free paths all work):
- int8: per-output-channel symmetric int8 + fp32 scale. On x86 CPUs the matmul is PyTorch's fbgemm dynamic int8
  kernel (activations quantized per call); elsewhere the weight is dequantized on the fly.
- int4-rtn / gptq / awq: asymmetric 4-bit codes, two per byte, with an fp16 scale and uint8 zero point per group of
  `group_size` input columns; awq adds a per-input-channel scale. On a CPU with native bf16 (`model.precision`:
  AVX512_BF16 / AMX) the matmul is PyTorch's packed int4 kernel (`_weight_int4pack_mm_for_cpu`, the one torchao's
  CPU int4 layout calls) with bf16 activations (with fp32 activations it falls back to a reference loop ~20x slower
  than an fp32 matmul). Where bf16 is emulated (AVX2) that kernel runs 1.3-2.3x slower than an fp32 matmul (measured
  with the capability forced to AVX2), so there the weight is dequantized once to fp32 on first use and kept: decode
  runs at fp32 speed and the checkpoint stays 4-bit. Group sizes the kernel does not take (not 32/64/128/256, or
  out_features not a multiple of 16) and other devices dequantize the weight on the fly.
- bnb-int8 / bnb-nf4: bitsandbytes `Linear8bitLt` / `Linear4bit` modules and their own state-dict layout.

GPTQ (Frantar et al. 2022) and AWQ (Lin et al. 2023) are written here rather than taken from GPTQModel /
llm-compressor / AutoAWQ: those operate on Hugging Face models with CUDA-oriented kernels and large dependency trees,
and were not tried on this CPU-only torch; the algorithms themselves are ~100 lines and run on our model directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from model.gpt import GPT
from model.precision import inference_dtype

METHODS: dict[str, int] = {"int8": 8, "int4-rtn": 4, "gptq": 4, "awq": 4, "bnb-int8": 8, "bnb-nf4": 4}
"""Method → bits of the block linears."""
CALIBRATED = {"gptq", "awq"}


class QuantizeError(ValueError):
    """Bad quantization input (unknown method, no calibration data, mismatched checkpoint); one line for the user."""


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
def block_linears(model: GPT) -> Iterator[tuple[str, nn.Module, str]]:
    """(block-relative name, parent module, attribute) of every linear layer in every block."""
    for i, block in enumerate(model.blocks):
        for parent_name, parent in (("attn", block.attn), ("mlp", block.mlp)):
            for attr in ("qkv", "proj", "up", "gate", "down"):
                if isinstance(getattr(parent, attr, None), nn.Module):
                    yield f"blocks.{i}.{parent_name}.{attr}", parent, attr


def _group_size(in_features: int, group_size: int) -> int:
    """The configured group size, or the whole row when it does not divide the input width."""
    return group_size if in_features % group_size == 0 else in_features


def _bitsandbytes() -> Any:
    """bitsandbytes, with its per-call "inputs will be cast to float16" warning (fp32 inputs to int8 layers, expected
    here, logged on every matmul: thousands of lines per evaluation) silenced."""
    import logging

    import bitsandbytes

    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return bitsandbytes


def _bnb_linear(linear: nn.Linear, method: str) -> nn.Module:
    bnb = _bitsandbytes()

    has_bias = linear.bias is not None
    if method == "bnb-int8":
        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False)
    else:
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias, compute_dtype=torch.float32,
                                   quant_type="nf4")
    module.load_state_dict(linear.state_dict())
    return module.to("cpu")  # bitsandbytes quantizes when the module is moved to its device


def quantize_head(model: GPT) -> None:
    """Output head and token embedding → int8 rows (one tensor when tied)."""
    tied = model.cfg.tie_embeddings
    head = QuantLinear.from_linear(model.lm_head, 8, 0)
    model.wte = QuantEmbedding.from_embedding(model.wte, head if tied else None)
    model.lm_head = head


@torch.no_grad()
def quantize_model(
    model: GPT, method: str, group_size: int = 128, calibration: torch.Tensor | None = None,
    act_order: bool = True, damp: float = 0.01,
) -> dict[str, Any]:
    """Quantize `model` in place with `method`; calibration (N, T) token ids for gptq/awq. → the quantization record
    stored in config.json."""
    if method not in METHODS:
        raise QuantizeError(f"unknown quantization method {method!r} (known: {', '.join(METHODS)})")
    if method in CALIBRATED and (calibration is None or len(calibration) == 0):
        raise QuantizeError(f"{method} needs calibration sequences (from the train shards)")
    model.eval().float()
    bits = METHODS[method]
    record: dict[str, Any] = {"method": method, "bits": bits, "group_size": group_size if bits == 4 else None,
                              "modules": {}}
    if method in CALIBRATED:
        _calibrated(model, method, group_size, calibration, act_order, damp, record)  # type: ignore[arg-type]
    else:
        for name, parent, attr in block_linears(model):
            linear = getattr(parent, attr)
            if method.startswith("bnb"):
                setattr(parent, attr, _bnb_linear(linear, method))
            else:
                gs = _group_size(linear.in_features, group_size)
                setattr(parent, attr, QuantLinear.from_linear(linear, bits, gs))
                record["modules"][name] = {"group_size": gs, "input_scale": False}
    if method in CALIBRATED:
        record["act_order"] = act_order if method == "gptq" else None
    quantize_head(model)
    model.eval()  # new modules start in training mode; bitsandbytes int8 only quantizes activations in eval mode
    return record


def _prefix(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The forward pass up to the first block: embeddings (+ positions) and the rope tables."""
    T = idx.shape[1]
    x = model.wte(idx)
    if model.wpe is not None:
        x = x + model.wpe.weight[:T]
    elif model.cfg.pos_encoding == "sinusoidal":
        x = x + model.pe[:T]
    rope = (model.rope_cos[:T], model.rope_sin[:T]) if model.cfg.pos_encoding == "rope" else None
    return x, rope


def _calibrated(
    model: GPT, method: str, group_size: int, calibration: torch.Tensor, act_order: bool, damp: float,
    record: dict[str, Any],
) -> None:
    """Block by block: run the calibration activations (already through the quantized earlier blocks), collect each
    linear's input statistics, quantize the block, and pass the activations on through the quantized block."""
    xs, rope = zip(*(_prefix(model, chunk) for chunk in calibration.split(8)))
    xs, rope = list(xs), rope[0]
    for i, block in enumerate(tqdm(model.blocks, desc=method, unit="block")):
        names = [(n, p, a) for n, p, a in block_linears(model) if n.startswith(f"blocks.{i}.")]
        stats: dict[str, dict[str, Any]] = {n: {"H": None, "n": 0, "rows": []} for n, _, _ in names}
        hooks = []
        for name, parent, attr in names:

            def hook(_: nn.Module, inputs: tuple[torch.Tensor], __: torch.Tensor, s: dict = stats[name]) -> None:
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                h = x.T @ x
                s["H"] = h if s["H"] is None else s["H"] + h
                s["n"] += len(x)
                s["rows"].append(x[torch.randperm(len(x))[:256]])

            hooks.append(getattr(parent, attr).register_forward_hook(hook))
        for x in xs:
            block(x, rope, None, 0)
        for h in hooks:
            h.remove()
        for name, parent, attr in names:
            linear, s = getattr(parent, attr), stats[name]
            gs = _group_size(linear.in_features, group_size)
            if method == "gptq":
                codes = gptq(linear.weight.float(), 2 * s["H"] / s["n"], gs, act_order, damp)
                setattr(parent, attr, QuantLinear.from_linear(linear, 4, gs, codes=codes))
            else:
                rows = torch.cat(s["rows"])
                scale = awq_scale(linear.weight.float(), rows, gs)
                codes = rtn_int4(awq_clip(linear.weight.float() * scale, rows / scale, gs), gs)
                setattr(parent, attr, QuantLinear.from_linear(linear, 4, gs, codes=codes, input_scale=scale))
            record["modules"][name] = {"group_size": gs, "input_scale": method == "awq"}
        xs = [block(x, rope, None, 0) for x in xs]


def gptq(
    w: torch.Tensor, H: torch.Tensor, group_size: int, act_order: bool = True, damp: float = 0.01, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ: quantize columns one at a time, spreading each column's error over the not-yet-quantized columns through
    the inverse Hessian (its upper Cholesky factor), in lazy blocks. act_order visits columns by decreasing Hessian
    diagonal; groups stay contiguous in the original order, their grids fixed up front ("static groups").
    w (out, in), H (in, in) = 2 XᵀX / n → (codes (out, in), scale (out, G), zero (out, G))."""
    w, H = w.clone(), H.clone()
    out_f, cols = w.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    w[:, dead] = 0
    G = cols // group_size
    scale, zero = torch.zeros(out_f, G), torch.zeros(out_f, G)
    if act_order:
        for g in range(G):
            scale[:, g], zero[:, g] = int4_params(w[:, g * group_size : (g + 1) * group_size])
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(cols)
    w, H = w[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(w)
    block = max(group_size, block // group_size * group_size)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1, Hinv1 = w[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if not act_order and col % group_size == 0:  # this group's grid, from the error-updated weights
                scale[:, g], zero[:, g] = int4_params(W1[:, i : i + group_size])
            q = int4_codes(W1[:, i], scale[:, g], zero[:, g])
            codes[:, i1 + i] = q
            err = (W1[:, i] - (q - zero[:, g]) * scale[:, g]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        w[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes[:, torch.argsort(perm)], scale, zero


def awq_scale(w: torch.Tensor, x: torch.Tensor, group_size: int, grid: int = 20) -> torch.Tensor:
    """AWQ: per-input-channel scales s = mean|x|^α (α searched on a grid) that protect the salient channels: the
    weight is quantized as W·s and the input divided by s. Chooses α minimising the output error on calibration rows
    x (n, in). The weight-clipping half of AWQ is `awq_clip`."""
    reference = x @ w.T
    magnitude = x.abs().mean(dim=0).clamp(min=1e-6)
    best, best_err = torch.ones(w.shape[1]), math.inf
    for alpha in torch.linspace(0, 1, grid + 1).tolist():
        s = magnitude.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q, scale, zero = rtn_int4(w * s, group_size)
        deq = ((groups_of(q, group_size) - zero[..., None]) * scale[..., None]).flatten(1)
        err = ((x / s) @ deq.T - reference).pow(2).mean().item()
        if err < best_err:
            best, best_err = s, err
    return best


def awq_clip(w: torch.Tensor, x: torch.Tensor, group_size: int, grid: int = 20, max_shrink: float = 0.5,
             max_rows: int = 1024, chunk: int = 256) -> torch.Tensor:
    """AWQ's clipping search: per output row and input group, the range [-r·max|w|, r·max|w|] (r from 1 down to
    1 - max_shrink) whose 4-bit RTN minimises that group's share of the output error on calibration rows x (n, in).
    Clipping outliers gives the remaining weights a finer grid; r = 1 is plain RTN, so on the calibration rows no
    group gets worse. w (out, in) → the clipped w, computed `chunk` output rows at a time to bound memory."""
    xg = groups_of(x[:max_rows], group_size)  # (n, G, gs)
    parts = []
    for wc in w.split(chunk):
        rows, cols = wc.shape
        wg = groups_of(wc, group_size)  # (rows, G, gs)
        reference = torch.einsum("ngk,ogk->ngo", xg, wg)  # each group's contribution to each output
        top = wg.abs().amax(dim=-1, keepdim=True)  # (rows, G, 1)
        best, best_err = wg.clone(), torch.full((rows, wg.shape[1]), math.inf)
        for i in range(int(grid * max_shrink) + 1):
            clipped = wg.clamp(-top * (1 - i / grid), top * (1 - i / grid))
            q, scale, zero = rtn_int4(clipped.reshape(rows, cols), group_size)
            deq = (groups_of(q, group_size) - zero[..., None]) * scale[..., None]  # (rows, G, gs)
            err = (torch.einsum("ngk,ogk->ngo", xg, deq) - reference).pow(2).mean(dim=0).T  # (rows, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[better] = clipped[better]
        parts.append(best.reshape(rows, cols))
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------- loading
def build_quantized(model: GPT, record: dict[str, Any]) -> GPT:
    """Replace the modules of a freshly built (unquantized) model by empty quantized ones matching `record`, ready for
    load_state_dict of a saved quantized checkpoint."""
    method, bits = record["method"], record["bits"]
    for name, parent, attr in block_linears(model):
        linear = getattr(parent, attr)
        if method.startswith("bnb"):
            setattr(parent, attr, _bnb_linear(linear, method))
        else:
            spec = record["modules"][name]
            setattr(parent, attr, QuantLinear(linear.in_features, linear.out_features, bits, spec["group_size"],
                                              linear.bias is not None, spec["input_scale"]))
    head = QuantLinear(model.cfg.n_embd, model.cfg.vocab_size, 8, 0, False, False)
    tied = model.cfg.tie_embeddings
    model.wte = QuantEmbedding(head) if tied else QuantEmbedding(None, model.cfg.vocab_size, model.cfg.n_embd)
    model.lm_head = head
    return model


def load_quantized_state(model: GPT, state: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """Load a quantized state dict; bitsandbytes NF4 weights are rebuilt from their packed data and stats."""
    if record["method"] == "bnb-nf4":
        bnb = _bitsandbytes()

        for name, parent, attr in block_linears(model):
            prefix = f"{name}.weight."
            stats = {k[len(prefix) :]: state.pop(k) for k in list(state) if k.startswith(prefix)}
            weight = bnb.nn.Params4bit.from_prequantized(state.pop(f"{name}.weight"), stats, requires_grad=False,
                                                         device="cpu")
            getattr(parent, attr).weight = weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (record["method"] == "bnb-nf4" and k.endswith(".weight") and "blocks." in k)]
    if missing or unexpected:
        raise QuantizeError(f"quantized weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")


def float_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) fp32 weight a quantized linear layer computes with (ours or bitsandbytes')."""
    if isinstance(module, QuantLinear):
        return module.dequantized()
    bnb = _bitsandbytes()

    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):  # row-wise absmax int8: w = CB · SCB / 127
        return module.weight.data.float() * module.weight.SCB.float()[:, None] / 127
    return module.weight.detach().float()


@torch.no_grad()
def dequantized_model(model: GPT) -> GPT:
    """A plain fp32 GPT whose weights are exactly the values the quantized `model` computes with; used to hand the
    bitsandbytes methods to transformers, whose quantizer maps these values back to the same codes (see export)."""
    plain = GPT(model.cfg).eval()
    state = plain.state_dict()
    source = model.state_dict()
    for key in state:  # norms, biases, learned positions: stored in full precision
        if key in source and source[key].shape == state[key].shape and source[key].is_floating_point():
            state[key] = source[key].float()
    for name, parent, attr in block_linears(model):
        state[f"{name}.weight"] = float_weight(getattr(parent, attr))
    state["lm_head.weight"] = model.lm_head.dequantized()
    wte = model.wte
    table = wte.head[0] if wte.head[0] is not None else wte
    state["wte.weight"] = table.qweight.float() * table.scales.float()[:, None]
    plain.load_state_dict(state)
    return plain


def quantized_state(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict to save (tied int8 tensors once, under lm_head)."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
