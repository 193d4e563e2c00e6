"""GPTQ (Frantar et al. 2022) and AWQ (Lin et al. 2023): 4-bit codes for the block linears of a GPT, calibrated on
token sequences from the train shards, block by block.

    raygpt quantize configs/demo.yaml quantize.methods=[gptq,awq]

Written here rather than taken from GPTQModel / llm-compressor / AutoAWQ: those operate on Hugging Face models with
CUDA-oriented kernels and large dependency trees, and were not tried on this CPU-only torch; the algorithms
themselves are ~100 lines and run on our model directly, on whatever device it is on (`raygpt quantize` calibrates
on the task's GPU when `quantize.num_gpus` reserves one: GPTQ's per-column loop and the Hessians are GPU work). The calibration activations enter the first block through
`GPT.embed`, the model's own embedding and position code, so a new position encoding cannot silently break them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from model.gpt import GPT
from model.quantize_kernels import QuantLinear, group_size_for, groups_of, int4_codes, int4_params, rtn_int4


def calibrate(
    model: GPT, linears: list[tuple[str, nn.Module, str]], method: str, group_size: int, calibration: torch.Tensor,
    act_order: bool, damp: float, record: dict[str, Any],
) -> None:
    """Block by block: run the calibration activations (already through the quantized earlier blocks), collect each
    linear's input statistics, quantize the block, and pass the activations on through the quantized block.
    `linears`: (name, parent, attribute) of every block linear (`model.quantize.block_linears`)."""
    xs, rope = zip(*(model.embed(chunk) for chunk in calibration.split(8)))  # the model's own embedding code
    xs, rope = list(xs), rope[0]
    for i, block in enumerate(tqdm(model.blocks, desc=method, unit="block")):
        names = [(n, p, a) for n, p, a in linears if n.startswith(f"blocks.{i}.")]
        stats: dict[str, dict[str, Any]] = {n: {"H": None, "n": 0, "rows": []} for n, _, _ in names}
        hooks = []
        for name, parent, attr in names:

            def hook(_: nn.Module, inputs: tuple[torch.Tensor], __: torch.Tensor, s: dict = stats[name]) -> None:
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                h = x.T @ x
                s["H"] = h if s["H"] is None else s["H"] + h
                s["n"] += len(x)
                s["rows"].append(x[torch.randperm(len(x), device=x.device)[:256]])

            hooks.append(getattr(parent, attr).register_forward_hook(hook))
        for x in xs:
            block(x, rope, None, 0)
        for h in hooks:
            h.remove()
        prefix = f"blocks.{i}."
        rows = {name[len(prefix) :]: torch.cat(s["rows"]) for name, s in stats.items()}  # block-relative names
        if method == "awq":
            awq_fold(block, model.cfg, rows, group_size)
        for name, parent, attr in names:
            linear, s = getattr(parent, attr), stats[name]
            gs = group_size_for(linear.in_features, group_size)
            if method == "gptq":
                codes = gptq(linear.weight.float(), 2 * s["H"] / s["n"], gs, act_order, damp)
            else:
                codes = rtn_int4(awq_clip(linear.weight.float(), rows[name[len(prefix) :]], gs), gs)
            setattr(parent, attr, QuantLinear.from_linear(linear, 4, gs, codes=codes))
            record["modules"][name] = {"group_size": gs, "input_scale": False}
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
    scale, zero = w.new_zeros(out_f, G), w.new_zeros(out_f, G)
    if act_order:
        for g in range(G):
            scale[:, g], zero[:, g] = int4_params(w[:, g * group_size : (g + 1) * group_size])
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(cols, device=w.device)
    w, H = w[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=w.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(w)
    order = perm.tolist()  # column indices on the host: no device sync per column
    block = max(group_size, block // group_size * group_size)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1, Hinv1 = w[:, i1:i2].clone(), w.new_zeros(out_f, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
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


@torch.no_grad()
def awq_fold(block: nn.Module, cfg: Any, rows: dict[str, torch.Tensor], group_size: int) -> None:
    """AWQ's per-input-channel scales s, folded in as AutoAWQ does, so that the quantized model is a plain 4-bit one
    that other programs load (`model.export_compressed`): the linears reading one input are scaled by s together
    (W·s, one search over their stacked rows) and the layer that produces that input is divided by s. Four places:
    norm1 → qkv; norm2 → up (+ gate); v → proj (only without grouped-query attention: several heads read one v row);
    up → down (only with SwiGLU: silu(gate)·up is linear in up, gelu(up) is not). A linear with no producer to fold
    into keeps s = 1 and gets only the clipping half (`awq_clip`). `rows` (block-relative name → calibration input
    rows) are divided by s in place of the inputs they now stand for."""
    attn, mlp = block.attn, block.mlp
    nh, nkv, hs = cfg.n_head, cfg.kv_heads, cfg.head_size

    def divide(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor) -> None:
        shape = s if weight.dim() == 1 else s[:, None]  # a norm's weight, or the producing rows of a linear
        weight.div_(shape.to(weight.dtype))
        if bias is not None:
            bias.div_(s.to(bias.dtype))

    v = slice((nh + nkv) * hs, (nh + 2 * nkv) * hs)  # qkv's v rows
    norm1_bias, norm2_bias = getattr(block.norm1, "bias", None), getattr(block.norm2, "bias", None)  # RMSNorm: none
    plan: list[tuple[list[str], Any]] = [(["attn.qkv"], lambda s: divide(block.norm1.weight, norm1_bias, s))]
    if nkv == nh:
        v_bias = None if attn.qkv.bias is None else attn.qkv.bias[v]
        plan.append((["attn.proj"], lambda s: divide(attn.qkv.weight[v], v_bias, s)))
    ups = ["mlp.up", "mlp.gate"] if mlp.gate is not None else ["mlp.up"]
    plan.append((ups, lambda s: divide(block.norm2.weight, norm2_bias, s)))
    if mlp.gate is not None:
        plan.append((["mlp.down"], lambda s: divide(mlp.up.weight, mlp.up.bias, s)))
    for names, fold in plan:
        linears = [getattr(attn if n.startswith("attn.") else mlp, n.split(".")[1]) for n in names]
        gs = group_size_for(linears[0].in_features, group_size)
        s = awq_scale(torch.cat([linear.weight.float() for linear in linears]), rows[names[0]], gs)
        fold(s)
        for name, linear in zip(names, linears):
            linear.weight.mul_(s.to(linear.weight.dtype))
            rows[name] = rows[name] / s


def awq_scale(w: torch.Tensor, x: torch.Tensor, group_size: int, grid: int = 20) -> torch.Tensor:
    """AWQ: per-input-channel scales s = mean|x|^α (α searched on a grid) that protect the salient channels: the
    weight is quantized as W·s and the input divided by s. Chooses α minimising the output error on calibration rows
    x (n, in). The weight-clipping half of AWQ is `awq_clip`."""
    reference = x @ w.T
    magnitude = x.abs().mean(dim=0).clamp(min=1e-6)
    best, best_err = w.new_ones(w.shape[1]), math.inf
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
        best, best_err = wg.clone(), wg.new_full((rows, wg.shape[1]), math.inf)
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
