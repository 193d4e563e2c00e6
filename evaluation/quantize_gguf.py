"""The GGUF rows of the quantization report: the full-precision checkpoint exported for llama.cpp with each of
`quantize.gguf` (`model.export_gguf`) and measured in llama.cpp itself, through llama-cpp-python.

    raygpt quantize configs/demo.yaml quantize.gguf=[q8_0,q4_0]      # rows gguf-q8_0, gguf-q4_0 in the report

Called by `evaluation.quantize` inside its timing task (phase 2), after raygpt's own decode timings, so nothing else
competes for the cores. Per file: its size, bits per byte and KL / top-1 agreement against raygpt's fp32 model on the
same val blocks (llama.cpp's logits of every position), and greedy decode tokens/s at batch 1 with the task's
threads. The files stay in RUN_DIR/quantized/gguf/ for `llama-cli -m` or an Ollama Modelfile.
"""

from __future__ import annotations

import math
import time
from typing import Any

from core import files
from core.errors import UserError
from core.layout import RunLayout

BITS = {"f32": 32, "f16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_k_m": 4.5}
"""Bits per weight of each GGUF type (q8_0 / q4_0: one fp16 scale per 32; q4_k_m: llama.cpp's nominal figure)."""


def require_binding() -> None:
    """One line, before any task starts, when llama-cpp-python is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError("quantize.gguf measures the files in llama.cpp: pip install 'raygpt[llamacpp]' "
                        "(llama-cpp-python), or set quantize.gguf: []") from None


def gguf_rows(checkpoint: str, quants: list[str], layout: RunLayout, ids: Any, new_tokens: int,
              threads: int) -> list[dict[str, Any]]:
    """Export and measure each of `quants`; `ids` (N, T) are the val blocks the fp32 model is compared on."""
    import torch
    import torch.nn.functional as F
    from llama_cpp import Llama

    from model.checkpoint import load_checkpoint
    from model.export_gguf import export_gguf

    loaded = load_checkpoint(checkpoint)
    with torch.no_grad():
        reference = F.log_softmax(loaded.model(ids)[0].float(), dim=-1)[:, :-1]  # (N, T-1, V)
    targets = ids[:, 1:]
    nbytes = sum(len(loaded.tokenizer.decode(row.tolist()).encode()) for row in targets)
    fp32_bpb = _nll(reference, targets) / math.log(2) / nbytes
    params = loaded.model.num_params()
    rows = []
    for quant in quants:
        path = export_gguf(checkpoint, layout.quantized_gguf_local(quant), quant, force=True)
        if layout.remote:
            files.upload(path, layout.quantized_gguf(quant))
        model = Llama(str(path), n_ctx=max(ids.shape[1], 16 + new_tokens), logits_all=True, verbose=False,
                      n_threads=threads, n_threads_batch=threads, seed=0)
        try:
            logprobs = []
            for row in ids.tolist():
                model.reset()
                model.eval(row)
                logprobs.append(F.log_softmax(torch.tensor(model.scores[: len(row)]).float(), dim=-1)[:-1])
            theirs = torch.stack(logprobs)
            model.reset()
            started = time.perf_counter()
            count = sum(1 for _, _ in zip(model.generate(ids[0, :16].tolist(), temp=0.0, top_k=1), range(new_tokens)))
            speed = count / (time.perf_counter() - started)
        finally:
            model.close()
        bpb = _nll(theirs, targets) / math.log(2) / nbytes
        size = path.stat().st_size
        rows.append({
            "method": f"gguf-{quant}", "bits": BITS[quant], "group_size": 32 if quant in ("q8_0", "q4_0") else None,
            "file": str(layout.quantized_gguf(quant)), "size_bytes": size, "bits_per_weight": 8 * size / params,
            "blocks_bpb": bpb, "blocks_bpb_fp32": fp32_bpb, "delta_bpb_pct": 100 * (bpb / fp32_bpb - 1),
            "kl_vs_fp32": F.kl_div(theirs, reference, log_target=True, reduction="sum").item() / targets.numel(),
            "top1_agreement": (theirs.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "decode_tokens_per_s": speed, "kernel": "llama.cpp",
        })
    return rows


def _nll(logprobs: Any, targets: Any) -> float:
    return -logprobs.gather(-1, targets[..., None]).sum().item()
