"""raygpt's int8 / int4-rtn / GPTQ / AWQ checkpoints as compressed-tensors checkpoints: the quantized format that vLLM
serves (its `compressed-tensors` W4A16 / W8A16 schemes) and transformers loads (its compressed-tensors integration).

    raygpt export runs/demo/quantized/gptq --out /tmp/demo-gptq-hf
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('/tmp/demo-gptq-hf')"

Why compressed-tensors: it is the format llm-compressor writes and both loaders read. vLLM takes asymmetric 4-bit
groups with zero points (its `WNA16_ZP_SUPPORTED_TYPES_MAP`) and symmetric 8-bit channels, exactly our codes; the
older GPTQ packing stores `zero - 1` and, in vLLM, only symmetric models run on its fast kernels. transformers
decompresses pack-quantized weights to dense ones on load, so the export also loads on a CPU.

The layout, per quantized linear (Llama family only: transformers' GPT-2 uses Conv1D, which compressed-tensors does
not quantize), with our codes written as they are, so nothing is rounded again:
- 4-bit (int4-rtn / gptq / awq): `weight_packed` (out, in/8) int32, eight signed codes (q - 8) per word, low bits
  first (compressed-tensors' own `pack_to_int32`); `weight_scale` (out, groups); `weight_zero_point` (out/8, groups)
  int32, zero - 8 packed along the rows; `weight_shape`. Weight = (q - zero) · scale, as ours.
- int8: `weight_packed` (out, in/4) int32, symmetric per output channel; `weight_scale` (out, 1).
Scales are written in fp32, the checkpoint's dtype: our fp16 scales are exact in fp32, and the dense weight that
transformers computes from them is then bit for bit ours; vLLM casts them to its activation dtype on load. The token
embedding and the output head (int8 in raygpt) are written dense with their exact dequantized values, and the head is
listed in `ignore`. AWQ's scales are folded into the layers before them when raygpt quantizes
(`model.quantize_calibrate.awq_fold`); an AWQ checkpoint from before that keeps them apart and is refused.
GPU loading in vLLM is not tested here (no GPU): the files pass compressed-tensors' own config model, and
transformers (which decompresses with compressed-tensors' own functions) reproduces raygpt's logits (tests/model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

from model.export import ExportError, to_hf
from model.gpt import GPT
from model.quantize import block_linears, dequantized_model
from model.quantize_kernels import QuantLinear, unpack4

COMPRESSED_METHODS = ("int8", "int4-rtn", "gptq", "awq")
"""raygpt methods written as compressed-tensors `pack-quantized` checkpoints."""

_LLAMA_NAMES = {  # our block linear → its transformers module(s): (parent, names); qkv is split in three
    "attn.qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "attn.proj": ("self_attn", ("o_proj",)),
    "mlp.up": ("mlp", ("up_proj",)), "mlp.gate": ("mlp", ("gate_proj",)), "mlp.down": ("mlp", ("down_proj",)),
}


def _tensors(module: QuantLinear) -> dict[str, torch.Tensor]:
    """One quantized linear's signed codes, scales and zero points (unpacked, before splitting fused rows)."""
    if module.bits == 8:
        return {"weight_packed": module.qweight, "weight_scale": module.scales.float()[:, None]}
    codes = (unpack4(module.qweight).to(torch.int16) - 8).to(torch.int8)  # (out, in), -8..7
    zeros = (module.zeros.to(torch.int16) - 8).to(torch.int8)  # (out, G)
    return {"weight_packed": codes, "weight_scale": module.scales.float(), "weight_zero_point": zeros}


def _pack(rows: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Pack one (split) layer's codes, and its zero points along the rows (compressed-tensors' layout)."""
    out = dict(rows, weight_shape=torch.tensor(rows["weight_packed"].shape))
    out["weight_packed"] = pack_to_int32(rows["weight_packed"], bits)
    if "weight_zero_point" in rows:
        out["weight_zero_point"] = pack_to_int32(rows["weight_zero_point"], bits, packed_dim=0)
    return out


def _scheme(bits: int, group_size: int, targets: list[str]) -> QuantizationScheme:
    if bits == 8:
        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    else:
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group_size)
    return QuantizationScheme(targets=targets, weights=weights, format="pack-quantized")


def compressed_layers(model: GPT) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The block linears of a quantized Llama-family `model` under transformers' names → (tensors, the
    `quantization_config` of config.json). Fused qkv rows are split into q/k/v; groups run along the input, so a
    row split keeps them whole."""
    cfg = model.cfg
    nh, nkv, hs = cfg.n_head, cfg.kv_heads, cfg.head_size
    tensors: dict[str, torch.Tensor] = {}
    by_group: dict[tuple[int, int], list[str]] = {}
    for name, parent, attr in block_linears(model):
        module = getattr(parent, attr)
        if not isinstance(module, QuantLinear):
            raise ExportError(f"{name} is not one of raygpt's int8/4-bit layers ({type(module).__name__})")
        if module.input_scale is not None:
            raise ExportError(
                f"{name} keeps AWQ's input scale apart (quantized by an earlier raygpt); quantize the checkpoint "
                "again, which folds the scales into the layers before"
            )
        layer, rest = name.removeprefix("blocks.").split(".", 1)
        part, theirs = _LLAMA_NAMES[rest]
        splits = [nh * hs, nkv * hs, nkv * hs] if rest == "attn.qkv" else [module.out_features]
        whole = _tensors(module)
        pieces = {key: value.split(splits) for key, value in whole.items()}
        for i, their in enumerate(theirs):
            prefix = f"model.layers.{layer}.{part}.{their}"
            for key, value in _pack({key: parts[i].contiguous() for key, parts in pieces.items()}, module.bits).items():
                tensors[f"{prefix}.{key}"] = value
            by_group.setdefault((module.bits, module.group_size), []).append(prefix)
    if len(by_group) == 1:  # one scheme: every Linear but the head, as llm-compressor writes it
        ((bits, group_size),) = by_group
        groups = {"group_0": _scheme(bits, group_size, ["Linear"])}
    else:  # group sizes differ where a width is not a multiple of the configured one: each layer named
        groups = {f"group_{i}": _scheme(bits, gs, names)
                  for i, ((bits, gs), names) in enumerate(sorted(by_group.items()))}
    config = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                                ignore=["lm_head"])
    return tensors, config.to_dict()


def save_compressed(model: GPT, folder: Path, eot_id: int | None) -> None:
    """config.json (with `quantization_config`), model.safetensors and generation_config.json of a quantized `model`
    into `folder`: the dense transformers model of its exact values (`model.export.to_hf`), its block linears
    replaced by their codes."""
    tensors, quantization_config = compressed_layers(model)
    hf = to_hf(dequantized_model(model), eot_id)
    state = {key: value for key, value in hf.state_dict().items() if not key.endswith(".weight")
             or key.removesuffix(".weight") + ".weight_packed" not in tensors}
    hf.config.quantization_config = quantization_config
    hf.save_pretrained(folder, state_dict=state | tensors, safe_serialization=True)
