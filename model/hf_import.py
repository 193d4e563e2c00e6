"""Import a Hugging Face checkpoint (Llama or GPT-2 architecture, local safetensors) as a raygpt checkpoint, the
inverse of `model/export.py`: `raygpt import HF_DIR --out CKPT`.

    raygpt import /models/my-llama --out runs/base/checkpoint
    # continued pretraining: model.init_from: runs/base/checkpoint, data.tokenizer.path: runs/base/checkpoint/tokenizer.json

Mappings (the imported model computes the same function):
  LlamaForCausalLM (default rope, GQA, optional attention/mlp biases)  → rope + rmsnorm + swiglu
  GPT2LMHeadModel (gelu_new, learned positions)                       → learned + layernorm + gelu, biases
Weights are read from `model.safetensors` or the shards of `model.safetensors.index.json` only: a `pytorch_model.bin`
is a pickle and is refused. The folder's `tokenizer.json` becomes the checkpoint's tokenizer and its eos token the
end-of-text token. Anything else (rope scaling, another activation, a head size that is not n_embd / n_head) is
refused with one line naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer

from core import files
from core.config import problem_line
from core.errors import one_line, shown
from model.checkpoint import MIN_BYTES_PER_PARAMETER, TOKENIZER, save_checkpoint
from model.export import ExportError, check_out
from model.flops import matmul_params
from model.gpt import GPT, ModelConfig


class HFImportError(ExportError):
    """A Hugging Face folder raygpt cannot import; one line."""


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or foreign one (a pickle under that name is never run) is one line."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise HFImportError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a transformers folder: model.safetensors, or the shards its index names, each inside
    the folder (an index entry like `../outside.safetensors` is refused)."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / "model.safetensors.index.json").is_file():
        index = files.read_json(folder / "model.safetensors.index.json", "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HFImportError(f"{folder}/model.safetensors.index.json: no 'weight_map' of tensor → file")
        return [files.inside(folder, name, "safetensors index entry") for name in sorted(set(weight_map.values()))]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise HFImportError(f"{folder}: only pickled weights (*.bin / *.pt), which raygpt never loads; re-save them with "
                           "safe_serialization=True")
    raise HFImportError(f"{folder}: no model.safetensors")


def _eot_token(folder: Path, config: dict[str, Any], tokenizer: Tokenizer) -> str:
    """The end-of-text token: the tokenizer config's eos token, else the model config's eos id."""
    eos = files.read_json(folder / "tokenizer_config.json", "tokenizer config").get("eos_token") if (folder / "tokenizer_config.json").is_file() else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    if eos is None and isinstance(config.get("eos_token_id"), int):
        eos = tokenizer.id_to_token(config["eos_token_id"])
    if not eos or tokenizer.token_to_id(eos) is None:
        raise HFImportError(f"{folder}: no end-of-text (eos) token in tokenizer_config.json or config.json")
    return str(eos)


def _llama_config(c: dict[str, Any]) -> ModelConfig:
    for rope in (c.get("rope_scaling") or {}, c.get("rope_parameters") or {}):  # older and newer transformers
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise HFImportError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported (default "
                                "rope only)")
    if c.get("hidden_act", "silu") != "silu":
        raise HFImportError(f"hidden_act {c['hidden_act']!r} is not supported (Llama's silu only)")
    cfg = ModelConfig(
        vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=c["num_hidden_layers"],
        n_head=c["num_attention_heads"], n_kv_head=c.get("num_key_value_heads") or c["num_attention_heads"],
        n_embd=c["hidden_size"], intermediate_size=c["intermediate_size"], pos_encoding="rope",
        rope_theta=(c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0)), mlp="swiglu",
        norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6), bias=bool(c.get("attention_bias", False)), dropout=0.0,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )
    if c.get("mlp_bias", False) != cfg.bias:
        raise HFImportError("attention_bias and mlp_bias differ; raygpt has one `bias` switch")
    if c.get("head_dim") not in (None, cfg.head_size):
        raise HFImportError(f"head_dim {c['head_dim']} ≠ hidden_size / num_attention_heads = {cfg.head_size}")
    return cfg


def _llama_weights(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"wte.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"]}
    out["lm_head.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.n_layer):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            out[p + f"attn.qkv.{kind}"] = torch.cat([sd[q + f"self_attn.{n}_proj.{kind}"] for n in "qkv"], dim=0)
            out[p + f"attn.proj.{kind}"] = sd[q + f"self_attn.o_proj.{kind}"]
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                out[p + f"mlp.{ours}.{kind}"] = sd[q + f"mlp.{theirs}.{kind}"]
        out[p + "norm1.weight"] = sd[q + "input_layernorm.weight"]
        out[p + "norm2.weight"] = sd[q + "post_attention_layernorm.weight"]
    return out


def _gpt2_config(c: dict[str, Any]) -> ModelConfig:
    if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFImportError(f"activation_function {c['activation_function']!r} is not supported (gelu_new only)")
    return ModelConfig(
        vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"], n_head=c["n_head"],
        n_embd=c["n_embd"], intermediate_size=c.get("n_inner") or 4 * c["n_embd"], pos_encoding="learned",
        mlp="gelu", norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5), bias=True, dropout=0.0,
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
    )


def _gpt2_weights(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"], "lm_head.weight": sd.get("lm_head.weight", sd["wte.weight"])}
    out |= {"norm_f.weight": sd["ln_f.weight"], "norm_f.bias": sd["ln_f.bias"]}
    for i in range(cfg.n_layer):
        p, q = f"blocks.{i}.", f"h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out |= {p + f"{ours}.weight": sd[q + f"{theirs}.weight"], p + f"{ours}.bias": sd[q + f"{theirs}.bias"]}
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")):
            out[p + f"{ours}.weight"] = sd[q + f"{theirs}.weight"].t().contiguous()  # HF's Conv1D stores (in, out)
            out[p + f"{ours}.bias"] = sd[q + f"{theirs}.bias"]
    return out


def _model_config(folder: Path, config: Any) -> tuple[str, ModelConfig]:
    """(model_type, raygpt config) of a transformers config.json; a missing key or an impossible shape is one line."""
    if not isinstance(config, dict):
        raise HFImportError(f"{folder}/config.json: not a JSON object")
    kind = config.get("model_type")
    if kind not in ("llama", "gpt2"):
        raise HFImportError(f"{folder}: model_type {shown(kind)} is not supported (llama or gpt2)")
    try:
        return kind, (_llama_config(config) if kind == "llama" else _gpt2_config(config))
    except KeyError as e:
        raise HFImportError(f"{folder}/config.json: no {e.args[0]!r} (needed for {kind})") from None
    except ValidationError as e:
        raise HFImportError(f"{folder}/config.json: {problem_line(e)}") from None


def from_hf(folder: str | Path) -> tuple[GPT, Path, str]:
    """(the raygpt model, the folder's tokenizer.json, the end-of-text token) of a transformers folder. Everything is
    checked before the model is built: the config's keys and shapes, the weights' size against the parameters the
    config describes (an absurd config is refused, not allocated), the tokenizer and the tensors."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HFImportError(f"{folder}: no config.json (a transformers model folder is needed)")
    config = files.read_json(folder / "config.json", "transformers config")
    kind, cfg = _model_config(folder, config)
    weight_files = _weight_files(folder)
    held = sum(f.stat().st_size for f in weight_files if f.is_file())
    if held < matmul_params(cfg) * MIN_BYTES_PER_PARAMETER:
        raise HFImportError(f"{folder}/config.json describes {matmul_params(cfg):,} matmul parameters but the weights "
                            f"hold {held:,} bytes; config and weights do not belong together")
    tokenizer_file = folder / TOKENIZER  # transformers' file name too
    if not tokenizer_file.is_file():
        raise HFImportError(f"{folder}: no tokenizer.json (a fast tokenizer is needed)")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise HFImportError(f"{tokenizer_file}: not a valid tokenizers file ({one_line(e)})") from None
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise HFImportError(f"{folder}: the tokenizer has {tokenizer.get_vocab_size()} tokens, the model {cfg.vocab_size}")
    weights = {k: v for f in weight_files for k, v in _safetensors(f).items()}
    try:
        state = (_llama_weights if kind == "llama" else _gpt2_weights)(weights, cfg)
    except KeyError as e:
        raise HFImportError(f"{folder}: the weights lack {e.args[0]!r}, which the config's architecture needs") from None
    model = GPT(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape than the config's
        raise HFImportError(f"{folder}: weights do not match the config ({one_line(e, 200)})") from None
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise HFImportError(f"{folder}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), tokenizer_file, _eot_token(folder, config, tokenizer)


def import_hf(folder: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the raygpt checkpoint of a transformers folder to `out` (atomically; replaces only with `force`). `out`
    may not be, contain or sit inside the source folder, nor be a file (`model.export.check_out`)."""
    if not Path(folder).is_dir():
        raise HFImportError(f"{folder}: not a folder (a transformers model folder is needed)")
    check_out(folder, out, force, "the source folder")
    model, tokenizer_file, eot = from_hf(folder)
    meta = {"eot_token": eot, "step": 0, "imported_from": str(folder)}
    if (template := chat_template_of(Path(folder))) is not None:
        meta["chat_template"] = template
    return save_checkpoint(model, out, tokenizer_file, meta, replace=True)


def chat_template_of(folder: Path) -> str | None:
    """A transformers folder's chat template: chat_template.jinja (transformers 5) or tokenizer_config.json's
    `chat_template` (a string; named templates are not taken)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "tokenizer_config.json").is_file():
        template = files.read_json(folder / "tokenizer_config.json", "tokenizer config").get("chat_template")
        return template if isinstance(template, str) else None
    return None
