"""The checkpoint handle: the folder that eval, quantize, generate and export take (model.safetensors + config.json +
tokenizer.json), loaded as one `Checkpoint` — model, config, tokenizer and metadata together, checked against each other.

    python -c "from model.checkpoint import load_checkpoint; print(load_checkpoint('runs/demo/checkpoint').config)"

Weights are safetensors (never pickles). A tied output projection is stored once (as the embedding). The folder is
written under a temporary name and renamed when complete (`cluster.files.atomic_folder`), so a crash never leaves a
half-written checkpoint. Nobody else reads config.json or guesses the end-of-text token: use the handle.
"""

from __future__ import annotations

import shutil
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from cluster.files import RunFileError, atomic_folder, read_json
from model.gpt import GPT, ModelConfig

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
FORMAT = "raygpt"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message is one line naming the problem."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its config, its tokenizer and the metadata saved with it."""

    folder: Path
    model: GPT
    config: ModelConfig
    tokenizer: Tokenizer
    meta: dict[str, Any]

    @property
    def step(self) -> int | None:
        return self.meta.get("step")

    @property
    def eot_token(self) -> str:
        return str(self.meta.get("eot_token", DEFAULT_EOT))

    @property
    def eot_id(self) -> int:
        """The end-of-text id (checked to exist when the checkpoint was loaded)."""
        return int(self.tokenizer.token_to_id(self.eot_token))

    @property
    def tokenizer_file(self) -> Path:
        return self.folder / TOKENIZER

    @property
    def quantization(self) -> dict[str, Any] | None:
        return self.meta.get("quantization")


DEFAULT_EOT = "<|endoftext|>"


def save_checkpoint(
    model: GPT, folder: str | Path, tokenizer_file: str | Path, extra: dict | None = None, replace: bool = False
) -> Path:
    """Write model weights, config and tokenizer to `folder` atomically; an existing folder only with `replace`."""
    folder = Path(folder)
    with atomic_folder(folder, replace=replace) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.cfg.tie_embeddings and "wte.weight" in state:
            state.pop("lm_head.weight")  # the same tensor as wte.weight (a quantized model stores it once already)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "model": model.cfg.model_dump(), **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's config.json (model config, step, eot_token, quantization record); one-line errors."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint (no {CONFIG})")
    try:
        meta = read_json(path, "checkpoint config")
    except RunFileError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path}: not a raygpt model config (no 'model' mapping)")
    return meta


def weights_stamp(folder: str | Path) -> dict[str, Any]:
    """Identifies a checkpoint's exact weights cheaply: resolved path, weights size and mtime, and its metadata."""
    weights = (Path(folder) / WEIGHTS).stat()
    return {"path": str(Path(folder).resolve()), "bytes": weights.st_size, "mtime_ns": weights.st_mtime_ns,
            "meta": read_meta(folder)}


def load_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / CONFIG
    try:
        return ModelConfig.model_validate(read_meta(folder)["model"])
    except ValidationError as e:
        first = e.errors()[0]
        raise CheckpointError(f"{path}: model.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def load_tokenizer_of(folder: Path, cfg: ModelConfig, eot_token: str) -> Tokenizer:
    """The checkpoint's tokenizer, which must be a valid tokenizers file of exactly the model's vocabulary."""
    path = folder / TOKENIZER
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{path}: not a valid tokenizers file ({str(e).splitlines()[0][:120]})") from None
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is {cfg.vocab_size}"
        )
    if tokenizer.token_to_id(eot_token) is None:
        raise CheckpointError(f"{path}: the tokenizer has no end-of-text token {eot_token!r}")
    return tokenizer


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """The checkpoint in `folder`, model in eval mode on `device`. Every problem is a one-line CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: missing {name}")
    meta = read_meta(folder)
    cfg = load_config(folder)
    tokenizer = load_tokenizer_of(folder, cfg, str(meta.get("eot_token", DEFAULT_EOT)))
    try:
        state = load_file(str(folder / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder / WEIGHTS}: corrupt safetensors file ({e})") from None
    record = meta.get("quantization")
    if record is not None:  # written by `raygpt quantize` (model/quantize.py)
        from model.quantize import QuantizeError, build_quantized, load_quantized_state

        model = build_quantized(GPT(cfg), record)
        try:
            load_quantized_state(model, state, record)
        except (QuantizeError, RuntimeError) as e:
            raise CheckpointError(f"{folder / WEIGHTS}: {str(e).splitlines()[0]}") from None
        return Checkpoint(folder, model.to(device).eval(), cfg, tokenizer, meta)
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
    return Checkpoint(folder, model.to(device).eval(), cfg, tokenizer, meta)
