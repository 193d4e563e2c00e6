"""Post-training quantization of a GPT: int8, 4-bit RTN / GPTQ / AWQ, and bitsandbytes int8 / NF4.

    raygpt quantize configs/demo.yaml                       # every configured method, as Ray tasks
    python -c "from model.checkpoint import load_checkpoint; load_checkpoint('runs/demo/quantized/gptq')"

What is quantized: every linear layer of the transformer blocks (attention qkv/proj, MLP up/gate/down) with the
method, and the token embedding / output head to int8 per row in every method (with tied embeddings they are one
int8 tensor). Norms, biases and learned positions stay fp32.

Formats (safetensors, loaded back by `model.checkpoint.load_checkpoint`, so generate/eval/export-free paths all work):
- int8: per-output-channel symmetric int8 + fp32 scale.
- int4-rtn / gptq / awq: asymmetric 4-bit codes, two per byte, with an fp16 scale and uint8 zero point per group of
  `group_size` input columns. AWQ's per-input-channel scales are folded into the norms and linears before the scaled
  layers (`model.quantize_calibrate.awq_fold`), so its layers are plain 4-bit ones; AWQ checkpoints written before
  that keep an `input_scale` per layer, which still loads and runs (not exported).
- bnb-int8 / bnb-nf4: bitsandbytes `Linear8bitLt` / `Linear4bit` modules and their own state-dict layout.

Each layer keeps only its codes and scales in memory and picks a weight-only kernel on its first call (PyTorch's
int8 / int4 CPU kernels with bf16 activations on any x86 CPU, tinygemm int4 on a CUDA GPU, else dequantizing per call;
`model.quantize_kernels`). On a GPU the activations are bf16, set by `set_activation_dtype` when
`model.checkpoint.load_for_inference` puts a quantized checkpoint there.

This module swaps quantized modules into a GPT and loads them back; the pieces live beside it: codes, layers and
kernels in `model.quantize_kernels`, GPTQ/AWQ in `model.quantize_calibrate`, bitsandbytes in `model.quantize_bnb`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from core.errors import UserError
from model.config import QUANT_METHODS, QuantMethod  # noqa: F401  # re-exported
from model.gpt import GPT
from model.quantize_bnb import bitsandbytes, bnb_linear
from model.quantize_calibrate import calibrate
from model.quantize_kernels import QuantEmbedding, QuantLinear, group_size_for

METHODS = QUANT_METHODS
"""Method → bits of the block linears: the one list of methods (the config's choices come from it)."""
CALIBRATED = {"gptq", "awq"}


class QuantizeError(UserError, ValueError):
    """Bad quantization input (unknown method, no calibration data, mismatched checkpoint); one line for the user."""


# ----------------------------------------------------------------------------------------------- model surgery
def block_linears(model: GPT) -> Iterator[tuple[str, nn.Module, str]]:
    """(block-relative name, parent module, attribute) of every linear layer in every block."""
    for i, block in enumerate(model.blocks):
        for parent_name, parent in (("attn", block.attn), ("mlp", block.mlp)):
            for attr in ("qkv", "proj", "up", "gate", "down"):
                if isinstance(getattr(parent, attr, None), nn.Module):
                    yield f"blocks.{i}.{parent_name}.{attr}", parent, attr


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
        calibrate(model, list(block_linears(model)), method, group_size, calibration, act_order, damp, record)  # type: ignore[arg-type]
    else:
        for name, parent, attr in block_linears(model):
            linear = getattr(parent, attr)
            if method.startswith("bnb"):
                setattr(parent, attr, bnb_linear(linear, method))
            else:
                gs = group_size_for(linear.in_features, group_size)
                setattr(parent, attr, QuantLinear.from_linear(linear, bits, gs))
                record["modules"][name] = {"group_size": gs, "input_scale": False}
    if method in CALIBRATED:
        record["act_order"] = act_order if method == "gptq" else None
    quantize_head(model)
    model.eval()  # new modules start in training mode; bitsandbytes int8 only quantizes activations in eval mode
    return record


# ----------------------------------------------------------------------------------------------- loading
def build_quantized(model: GPT, record: dict[str, Any]) -> GPT:
    """Replace the modules of a freshly built (unquantized) model by empty quantized ones matching `record`, ready for
    load_state_dict of a saved quantized checkpoint."""
    method, bits = record["method"], record["bits"]
    for name, parent, attr in block_linears(model):
        linear = getattr(parent, attr)
        if method.startswith("bnb"):
            setattr(parent, attr, bnb_linear(linear, method))
        else:
            spec = record["modules"][name]
            setattr(parent, attr, QuantLinear(linear.in_features, linear.out_features, bits, spec["group_size"],
                                              linear.bias is not None, spec["input_scale"]))
    head = QuantLinear(model.cfg.n_embd, model.cfg.vocab_size, 8, 0, False, False)
    tied = model.cfg.tie_embeddings
    model.wte = QuantEmbedding(head) if tied else QuantEmbedding(None, model.cfg.vocab_size, model.cfg.n_embd)
    model.lm_head = head
    return model


def load_quantized_state(model: GPT, state: dict[str, torch.Tensor], record: dict[str, Any], assign: bool = False) -> None:
    """Load a quantized state dict; bitsandbytes NF4 weights are rebuilt from their packed data and stats. `assign`:
    the model is a meta skeleton and takes `state`'s tensors themselves."""
    if record["method"] == "bnb-nf4":
        bnb = bitsandbytes()

        for name, parent, attr in block_linears(model):
            prefix = f"{name}.weight."
            stats = {k[len(prefix) :]: state.pop(k) for k in list(state) if k.startswith(prefix)}
            weight = bnb.nn.Params4bit.from_prequantized(state.pop(f"{name}.weight"), stats, requires_grad=False,
                                                         device="cpu")
            getattr(parent, attr).weight = weight
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in missing if not (record["method"] == "bnb-nf4" and k.endswith(".weight") and "blocks." in k)]
    if missing or unexpected:
        raise QuantizeError(f"quantized weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")


def float_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) fp32 weight a quantized linear layer computes with (ours or bitsandbytes')."""
    if isinstance(module, QuantLinear):
        return module.dequantized()
    bnb = bitsandbytes()

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


def set_activation_dtype(model: GPT, dtype: torch.dtype) -> GPT:
    """Run a quantized model's activations in `dtype` (bf16 / fp16 on a GPU): its norms, biases and learned positions
    are cast, while codes and scales keep their dtypes (`model.to(dtype)` would round the int8 and 4-bit scales) and
    the position tables stay fp32 (cast where used). Each quantized linear layer then picks its kernel for the
    activations it sees; bitsandbytes layers convert on their own."""
    for module in model.modules():
        if isinstance(module, QuantEmbedding):
            module.out_dtype = dtype
        if isinstance(module, QuantLinear) or type(module).__module__.startswith("bitsandbytes"):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    return model


def quantized_state(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict to save (tied int8 tensors once, under lm_head)."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
