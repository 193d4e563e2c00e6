"""Text in, text out: `raygpt generate CHECKPOINT --prompt TEXT` streams a checkpoint's continuation to stdout.

    raygpt generate runs/demo/checkpoint --prompt "import os" --max-new-tokens 80 --temperature 0.8 --top-k 40
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch

from model.checkpoint import load_checkpoint
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
) -> str:
    """Write the prompt, then each new piece of text as soon as it decodes cleanly; return the continuation."""
    out = out or sys.stdout
    loaded = load_checkpoint(checkpoint)
    model, tokenizer, eot = loaded.model, loaded.tokenizer, loaded.eot_id
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eot]
    prompt_ids = torch.tensor([ids[-(loaded.config.block_size - 1) :]])
    out.write(prompt)
    new: list[int] = []
    shown = ""
    for token in generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, eot, seed):
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
