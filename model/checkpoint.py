"""The checkpoint folder that eval, quantize, generate and export take: model.safetensors + config.json + tokenizer.json.

    python -c "from model.checkpoint import load_checkpoint; print(load_checkpoint('runs/demo/checkpoint')[1])"

Weights are safetensors (never pickles). A tied output projection is stored once (as the embedding). The folder is
written under a temporary name and renamed when complete, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.gpt import GPT, ModelConfig

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
FORMAT = "raygpt"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message is one line naming the problem."""


def save_checkpoint(model: GPT, folder: str | Path, tokenizer_file: str | Path, extra: dict | None = None) -> Path:
    """Write model weights, config and tokenizer to `folder` atomically (temp folder, then rename)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings and "wte.weight" in state:
        state.pop("lm_head.weight")  # the same tensor as wte.weight (a quantized model stores it once already)
    save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "model": model.cfg.model_dump(), **(extra or {})}
    (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint (no {CONFIG})")
    try:
        meta = json.loads(path.read_text())
        return ModelConfig.model_validate(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a raygpt model config ({type(e).__name__}: {e})") from None
    except ValidationError as e:
        first = e.errors()[0]
        raise CheckpointError(f"{path}: model.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, ModelConfig, Path]:
    """→ (model in eval mode, its config, path of its tokenizer.json). Every problem is a one-line CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: missing {name}")
    cfg = load_config(folder)
    try:
        state = load_file(str(folder / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder / WEIGHTS}: corrupt safetensors file ({e})") from None
    record = json.loads((folder / CONFIG).read_text()).get("quantization")
    if record is not None:  # written by `raygpt quantize` (model/quantize.py)
        from model.quantize import QuantizeError, build_quantized, load_quantized_state

        model = build_quantized(GPT(cfg), record)
        try:
            load_quantized_state(model, state, record)
        except (QuantizeError, RuntimeError) as e:
            raise CheckpointError(f"{folder / WEIGHTS}: {str(e).splitlines()[0]}") from None
        return model.to(device).eval(), cfg, folder / TOKENIZER
    model = GPT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    if missing := sorted(set(expected) - set(state)):
        raise CheckpointError(f"{folder / WEIGHTS}: missing tensor {missing[0]} (and {len(missing) - 1} more)")
    if unexpected := sorted(set(state) - set(expected)):
        raise CheckpointError(f"{folder / WEIGHTS}: unexpected tensor {unexpected[0]}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(
                f"{folder / WEIGHTS}: {name} has shape {tuple(state[name].shape)}, the config needs {tuple(shape)}"
            )
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model.to(device).eval(), cfg, folder / TOKENIZER
