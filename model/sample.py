"""Text in, text out: `raygpt generate CHECKPOINT --prompt TEXT` streams a checkpoint's continuation to stdout.

    raygpt generate runs/demo/checkpoint --prompt "import os" --max-new-tokens 80 --temperature 0.8 --top-k 40
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch

from model.checkpoint import load_for_inference
from model.generate import generate_tokens


def stream_text(
    checkpoint: str | Path,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    out: TextIO | None = None,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
) -> str:
    """Write the prompt, then each new piece of text as soon as it decodes cleanly; return the continuation.
    `device`: auto (a GPU when there is one), cuda or cpu; `precision` as `model.precision.inference_precision`;
    `compile`: decode through torch.compile (`model.generate`)."""
    out = out or sys.stdout
    loaded, _ = load_for_inference(checkpoint, {"auto": None, "cuda": True, "cpu": False}[device], precision)
    model, tokenizer, eot = loaded.model, loaded.tokenizer, loaded.eot_id
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eot]
    prompt_ids = torch.tensor([ids[-(loaded.config.block_size - 1) :]], device=next(model.parameters()).device)
    out.write(prompt)
    new: list[int] = []
    shown = ""
    for token in generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, eot, seed, compile):
        if token.item() == eot:
            break
        new.append(int(token.item()))
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            out.write(text[len(shown) :])
            out.flush()
            shown = text
    out.write("\n")
    return tokenizer.decode(new)
