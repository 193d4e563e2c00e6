"""The checkpoint handle: the folder that eval, quantize, generate and export take (model.safetensors + config.json +
tokenizer.json), loaded as one `Checkpoint` — model, config, tokenizer and metadata together, checked against each other.

    python -c "from model.checkpoint import load_checkpoint; print(load_checkpoint('runs/demo/checkpoint').config)"

Weights are safetensors (never pickles). A tied output projection is stored once (as the embedding). The folder is
written under a temporary name and renamed when complete (`core.files.atomic_folder`), so a crash never leaves a
half-written checkpoint. Nobody else reads config.json or guesses the end-of-text token: use the handle.

A checkpoint may also be given as a location on object storage (`core.files`): a run directory URI, its
published pointer (RUN_DIR/checkpoint, a JSON object naming the step's model folder and the sha256 of its files), or a
model folder URI. It is downloaded once into the local cache (`core.layout.cache_dir()`/checkpoints), under a name
made from its files' hashes, verified, and reused by every later load — `local_checkpoint` does this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from core import cache, files
from core.chat import default_template
from core.config import problem_line
from core.errors import RunFileError, UserError
from core.files import atomic_folder, fingerprint, read_json, sha256
from core.layout import Location, RunLayout, cached_checkpoint, is_uri, join
from model.flops import matmul_params
from model.gpt import GPT, ModelConfig

if TYPE_CHECKING:
    from model.precision import Choice

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
FORMAT = "raygpt"
POINTER_VERSION = 1
"""Version of the published-checkpoint pointer object (a run on object storage)."""


class CheckpointError(UserError, ValueError):
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

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template: the checkpoint's own (config.json `chat_template`, e.g. an imported model's),
        else ChatML when its tokenizer has ChatML's turn tokens (`core.chat`), else None (a base model's tokenizer
        without them: no chat)."""
        return self.meta.get("chat_template") or default_template(self.tokenizer)


DEFAULT_EOT = "<|endoftext|>"


def checkpoint_parts(state: dict[str, torch.Tensor], cfg: ModelConfig, extra: dict | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """What a checkpoint folder holds besides its tokenizer: the weights to save (a tied output projection once), the
    safetensors metadata and the text of config.json. `save_checkpoint` writes them; the training checkpointer
    streams them into storage itself."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if cfg.tie_embeddings and "wte.weight" in state:
        state.pop("lm_head.weight", None)  # the same tensor as wte.weight (a quantized model stores it once already)
    meta = {"format": FORMAT, "model": cfg.model_dump(), **(extra or {})}
    return state, {"format": FORMAT}, json.dumps(meta, indent=2) + "\n"


def save_checkpoint(
    model: GPT, folder: str | Path, tokenizer_file: str | Path, extra: dict | None = None, replace: bool = False
) -> Path:
    """Write model weights, config and tokenizer to `folder` atomically; an existing folder only with `replace`."""
    folder = Path(folder)
    with atomic_folder(folder, replace=replace) as tmp:
        state, metadata, config = checkpoint_parts(model.state_dict(), model.cfg, extra)
        save_file(state, str(tmp / WEIGHTS), metadata=metadata)
        (tmp / CONFIG).write_text(config)
        (tmp / TOKENIZER).write_bytes(files.read_bytes(tokenizer_file))  # a local file or an object
    return folder


def pointer(step: int, model: Location, records: dict[str, Any]) -> dict[str, Any]:
    """The published-checkpoint object of a run on object storage: the step, its model folder and each file's size
    and sha256 (from the step's commit record)."""
    return {"version": POINTER_VERSION, "step": step, "model": str(model), "files": records}


def _remote_files(loc: str) -> tuple[str, dict[str, Any], bool]:
    """(model folder URI, {file: {bytes, sha256?}}, hashed) of a checkpoint given on object storage."""
    target = loc
    if not files.is_file(target) and files.is_file(RunLayout.of(loc).checkpoint):
        target = str(RunLayout.of(loc).checkpoint)  # a run directory: its published checkpoint
    if files.is_file(target):
        found = files.read_json(target, "checkpoint pointer")
        if not (isinstance(found, dict) and found.get("version") == POINTER_VERSION and found.get("files")):
            raise CheckpointError(f"{target}: not a raygpt checkpoint pointer")
        return str(found["model"]), found["files"], True
    if not files.is_file(join(loc, CONFIG)):
        raise CheckpointError(f"checkpoint not found: {loc} (no {CONFIG}, no published checkpoint)")
    step_dir = loc.rstrip("/").rsplit("/", 1)[0]
    commit = join(step_dir, RunLayout.COMMIT)
    if files.is_file(commit):  # a model folder inside a committed training checkpoint: the record has its hashes
        prefix = loc.rstrip("/").rsplit("/", 1)[1] + "/"
        record = files.read_json(commit, "commit record")
        records = {k[len(prefix):]: v for k, v in record.get("files", {}).items() if k.startswith(prefix)}
        if records:
            return loc, records, True
    stamps = files.stamps_under(loc)  # no hashes: a rewritten file has a new modification time
    return loc, {name: {"bytes": size, "mtime_ns": mtime} for name, (size, mtime) in stamps.items()}, False


def local_checkpoint(loc: Location) -> Path:
    """A checkpoint as a local folder. Local paths are returned as they are; a checkpoint on object storage is
    downloaded once into the cache, keyed by its files' hashes (by name, size and modification time for a folder
    without a commit record), verified against them, and found there by every later call."""
    if not is_uri(loc):
        return Path(loc)
    try:
        model, records, hashed = _remote_files(str(loc))
        key = fingerprint({"files": records} if hashed else {"at": model, "files": records})
        folder = cached_checkpoint(key)
        if folder.is_dir():
            cache.used(folder)
            return folder
        try:
            with atomic_folder(folder) as tmp:
                for name, want in records.items():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / name).write_bytes(files.read_bytes(join(model, *name.split("/"))))
                    if (tmp / name).stat().st_size != want["bytes"] or (
                        hashed and sha256(tmp / name) != want["sha256"]
                    ):
                        raise CheckpointError(f"{join(model, name)}: size or sha256 differs from its record; not loading it")
        except (RunFileError, OSError):
            if not folder.is_dir():
                raise
            # another task on this node cached the same files first: use that copy (never replace one being read)
        cache.prune(keep=folder)  # least recently used copies beyond RAYGPT_CACHE_GB go
        return folder
    except FileNotFoundError as e:
        raise CheckpointError(f"{loc}: a file of the checkpoint is missing ({e})") from None
    except RunFileError as e:
        raise CheckpointError(str(e)) from None


def published_step(loc: Location) -> int | None:
    """The step of a run's published checkpoint (RUN_DIR/checkpoint), None when nothing is published."""
    if is_uri(loc):
        if not files.is_file(loc):
            return None
        return int(files.read_json(loc, "checkpoint pointer")["step"])
    return read_meta(loc).get("step") if Path(loc).is_dir() else None


def read_meta(folder: Location) -> dict[str, Any]:
    """A checkpoint's config.json (model config, step, eot_token, quantization record); one-line errors."""
    folder = local_checkpoint(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint (no {CONFIG})")
    try:
        meta = read_json(path, "checkpoint config")
    except RunFileError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path}: not a raygpt model config (no 'model' mapping)")
    return meta


def weights_stamp(folder: Location) -> dict[str, Any]:
    """Identifies a checkpoint's exact weights cheaply: resolved path, weights size and mtime, and its metadata. A
    checkpoint on object storage: its files' records (hashes, or sizes and the store's modification times), the same
    from every node."""
    if is_uri(folder):
        _, files, _ = _remote_files(str(folder))
        return {"files": files, "meta": read_meta(folder)}
    weights = (Path(folder) / WEIGHTS).stat()
    return {"path": str(Path(folder).resolve()), "bytes": weights.st_size, "mtime_ns": weights.st_mtime_ns,
            "meta": read_meta(folder)}


def load_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / CONFIG
    try:
        return ModelConfig.model_validate(read_meta(folder)["model"])
    except ValidationError as e:
        raise CheckpointError(f"{path}: {problem_line(e, prefix='model.')}") from None


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


MIN_BYTES_PER_PARAMETER = 0.45
"""The fewest weight-file bytes per parameter of any format raygpt writes (int4: 0.5 plus scales)."""


def _check_size(weights: Path, cfg: ModelConfig) -> None:
    """Refuse a config that describes far more parameters than its weights file can hold, before anything is
    allocated (a `config.json` saying `n_layer: 100000` must not cost 8 GB of memory to find out). Counted, not built:
    the matmul weights alone (`model.flops.matmul_params`) are a lower bound of what any file of them holds."""
    parameters = matmul_params(cfg)
    held = weights.stat().st_size
    if held < parameters * MIN_BYTES_PER_PARAMETER:
        raise CheckpointError(f"{weights.parent / CONFIG}: the config describes {parameters:,} parameters but "
                              f"{weights.name} holds {held:,} bytes; config and weights do not belong together")


def load_checkpoint(folder: Location, device: str | torch.device = "cpu") -> Checkpoint:
    """The checkpoint in `folder` (local, or on object storage: `local_checkpoint`), model in eval mode on `device`.
    Every problem is a one-line CheckpointError."""
    folder = local_checkpoint(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: missing {name}")
    meta = read_meta(folder)
    cfg = load_config(folder)
    _check_size(folder / WEIGHTS, cfg)
    tokenizer = load_tokenizer_of(folder, cfg, str(meta.get("eot_token", DEFAULT_EOT)))
    try:
        state = load_file(str(folder / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder / WEIGHTS}: corrupt safetensors file ({e})") from None
    record = meta.get("quantization")
    if record is not None:  # written by `raygpt quantize` (model/quantize.py)
        from model.quantize import QuantizeError, build_quantized, load_quantized_state

        # Ours are built without any weights (meta) and take the file's tensors, copied once out of its mapping into
        # our allocator's aligned memory (the kernels need it): loading a 4-bit model never holds its fp32 size.
        # bitsandbytes' modules need real float weights to be built.
        bnb = str(record.get("method", "")).startswith("bnb")
        with torch.device("cpu" if bnb else "meta"):
            model = build_quantized(GPT(cfg), record)
        if not bnb:
            state = {name: tensor.clone() for name, tensor in state.items()}
        try:
            load_quantized_state(model, state, record, assign=not bnb)
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


def load_for_inference(folder: Location, use_gpu: bool | None = None, precision: str = "auto") -> tuple[Checkpoint, Choice]:
    """A checkpoint ready for inference where this task runs (`model.precision.inference_device`: CUDA when it may
    and can use a GPU) in the dtype of `inference_precision` (auto: bf16 on GPUs that have it, else fp16; bf16 on CPUs
    that run it natively, else fp32). A quantized checkpoint keeps its codes and scales; its activations run in that
    dtype (`model.quantize.set_activation_dtype`), which on a GPU selects the bf16 int4 kernel."""
    from model.precision import inference_device, inference_precision

    device = inference_device(use_gpu)
    loaded = load_checkpoint(folder, device=device)
    choice = inference_precision(device, precision)  # type: ignore[arg-type]
    if "quantization" not in loaded.meta:
        loaded.model.to(choice.dtype)
    elif choice.dtype != torch.float32:
        from model.quantize import set_activation_dtype

        set_activation_dtype(loaded.model, choice.dtype)
    return loaded, choice
