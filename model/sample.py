"""Text in, text out: `raygpt generate CHECKPOINT --prompt TEXT` streams a checkpoint's continuation to stdout, and
the sample stage of `raygpt run` writes one to RUN_DIR/sample.txt.

    raygpt generate runs/demo/checkpoint --prompt "import os" --max-new-tokens 80 --temperature 0.8 --top-k 40
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch

from core import files
from core.chat import stop_ids
from core.layout import Location
from model.checkpoint import load_for_inference
from model.config import SampleConfig
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
    stops = stop_ids(tokenizer, eot, loaded.chat_template)
    for token in generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, eot, seed, compile):
        if token.item() in stops:
            break
        new.append(int(token.item()))
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            out.write(text[len(shown) :])
            out.flush()
            shown = text
    out.write("\n")
    return tokenizer.decode(new)


def _sample(checkpoint: str, cfg: SampleConfig) -> str:
    """Ray task: the prompt and its generated continuation."""
    loaded, _ = load_for_inference(checkpoint)  # the task's GPU when it reserved one
    ids = loaded.tokenizer.encode(cfg.prompt, add_special_tokens=False).ids or [loaded.eot_id]
    prompt_ids = torch.tensor([ids[-(loaded.config.block_size - 1) :]], device=next(loaded.model.parameters()).device)
    stops = stop_ids(loaded.tokenizer, loaded.eot_id, loaded.chat_template)  # a chat model's reply ends its turn
    new: list[int] = []
    for token in generate_tokens(loaded.model, prompt_ids, cfg.max_new_tokens, temperature=cfg.temperature,
                                 top_k=cfg.top_k, top_p=cfg.top_p, eos_id=loaded.eot_id, seed=cfg.seed,
                                 compile=cfg.compile):
        if int(token[0]) in stops:
            break
        new.append(int(token[0]))
    return loaded.tokenizer.decode(prompt_ids[0].cpu().tolist() + new, skip_special_tokens=True)


def sample_stage(checkpoint: Location, cfg: SampleConfig, out: Location, use_gpu: bool) -> str:
    """The sample stage of `raygpt run`: the checkpoint's continuation of `sample.prompt`, generated in a Ray task (on
    a GPU when `use_gpu`), written to `out` and printed."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_sample)
    text = ray.get(task.remote(str(checkpoint), cfg))
    written = files.atomic_write(out, text)
    print(f"[sample] {written}:\n{text}", flush=True)
    return text
