"""Export a raygpt checkpoint to Hugging Face format: `raygpt export CHECKPOINT --out DIR`.

    raygpt export runs/demo/checkpoint --out /tmp/demo-hf
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('/tmp/demo-hf')"

Mappings (faithful: the exported model computes the same function):
  rope + rmsnorm + swiglu                        → LlamaForCausalLM (biases → attention_bias / mlp_bias, GQA kept)
  learned | sinusoidal + layernorm + gelu, MHA    → GPT2LMHeadModel (a sinusoidal table becomes wpe's weights;
                                                    bias=false exports zero biases)
Anything else has no Hugging Face equivalent and is refused with one line saying why. The end-of-text token is the
model's bos/eos/pad token (config.json, generation_config.json), so `generate` stops at it. The checkpoint's chat
template goes into tokenizer_config.json (`chat_template`: `apply_chat_template` formats as raygpt does), and with
ChatML the end-of-turn token is a second eos id. `model/hf_import.py` is the other direction.

Quantized checkpoints export with `quantization_config` in config.json, and `raygpt quantize` writes that export to
RUN_DIR/quantized/<method>/hf: bnb-int8 / bnb-nf4 in bitsandbytes' layout (transformers, CUDA or CPU); int8 /
int4-rtn / gptq / awq as compressed-tensors `pack-quantized` (transformers and vLLM; Llama family only,
`model.export_compressed`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
)

from core.chat import stop_ids
from core.errors import UserError
from core.files import atomic_folder
from model.checkpoint import load_checkpoint, load_config, local_checkpoint, read_meta
from model.gpt import GPT, ModelConfig


class ExportError(UserError, ValueError):
    """A model config with no Hugging Face equivalent."""


def architecture(cfg: ModelConfig) -> str:
    if cfg.pos_encoding == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        return "llama"
    if cfg.pos_encoding in ("learned", "sinusoidal") and cfg.norm == "layernorm" and cfg.mlp == "gelu":
        if cfg.kv_heads != cfg.n_head:
            raise ExportError("GPT-2 has no grouped-query attention: export needs n_kv_head == n_head")
        return "gpt2"
    raise ExportError(
        f"no Hugging Face equivalent for pos_encoding={cfg.pos_encoding}, norm={cfg.norm}, mlp={cfg.mlp} "
        "(exportable: rope+rmsnorm+swiglu → Llama, learned|sinusoidal+layernorm+gelu → GPT-2)"
    )


def _llama(model: GPT, eot_id: int | None = None) -> LlamaForCausalLM:
    cfg = model.cfg
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.bias, mlp_bias=cfg.bias, bos_token_id=eot_id, eos_token_id=eot_id,
    )
    sd = model.state_dict()
    hs, nh, nkv = cfg.head_size, cfg.n_head, cfg.kv_heads
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["norm_f.weight"]}
    out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            wq, wk, wv = sd[p + f"attn.qkv.{kind}"].split([nh * hs, nkv * hs, nkv * hs], dim=0)
            out |= {q + f"self_attn.q_proj.{kind}": wq, q + f"self_attn.k_proj.{kind}": wk}
            out |= {q + f"self_attn.v_proj.{kind}": wv, q + f"self_attn.o_proj.{kind}": sd[p + f"attn.proj.{kind}"]}
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                out[q + f"mlp.{theirs}.{kind}"] = sd[p + f"mlp.{ours}.{kind}"]
        out[q + "input_layernorm.weight"] = sd[p + "norm1.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "norm2.weight"]
    hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(out, strict=True)
    return hf


def _gpt2(model: GPT, eot_id: int | None = None) -> GPT2LMHeadModel:
    cfg = model.cfg
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.hidden_size, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eot_id, eos_token_id=eot_id,
    )
    sd = model.state_dict()

    wpe = sd["wpe.weight"] if cfg.pos_encoding == "learned" else model.pe
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": wpe, "lm_head.weight": sd["lm_head.weight"]}
    out["transformer.ln_f.weight"] = sd["norm_f.weight"]
    out["transformer.ln_f.bias"] = sd.get("norm_f.bias", torch.zeros_like(sd["norm_f.weight"]))
    for i in range(cfg.n_layer):
        p, q = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[q + f"{theirs}.weight"] = sd[p + f"{ours}.weight"]
            out[q + f"{theirs}.bias"] = sd.get(p + f"{ours}.bias", torch.zeros_like(sd[p + f"{ours}.weight"]))
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")):
            weight = sd[p + f"{ours}.weight"]  # (out, in); HF's Conv1D stores (in, out)
            out[q + f"{theirs}.weight"] = weight.t().contiguous()
            out[q + f"{theirs}.bias"] = sd.get(p + f"{ours}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    hf = GPT2LMHeadModel(hf_cfg)
    missing, unexpected = hf.load_state_dict(out, strict=False)
    if unexpected or [k for k in missing if not k.endswith(".attn.bias")]:  # attn.bias: HF's causal-mask buffer
        raise ExportError(f"GPT-2 mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf


def to_hf(model: GPT, eot_id: int | None = None) -> torch.nn.Module:
    """The equivalent transformers model (in memory). With `eot_id`, the end-of-text token is its bos/eos token and
    its generation config stops there and pads with it, as GPT-2's <|endoftext|> does."""
    hf = _llama(model, eot_id) if architecture(model.cfg) == "llama" else _gpt2(model, eot_id)
    if eot_id is not None:
        hf.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    return hf


def hf_tokenizer(tokenizer_file: Path, eot_token: str, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """The transformers tokenizer of a checkpoint: end-of-text as bos/eos, and its chat template, which
    `save_hf_tokenizer` writes into tokenizer_config.json so that `apply_chat_template` formats as raygpt does."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    if tokenizer.convert_tokens_to_ids(eot_token) is not None:
        tokenizer.eos_token = eot_token
        tokenizer.bos_token = eot_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_hf_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """tokenizer.json and tokenizer_config.json, the chat template inside the latter (transformers 5 would otherwise
    write it to chat_template.jinja, which older transformers and other readers of tokenizer_config.json miss)."""
    tokenizer.save_pretrained(folder, save_jinja_files=False)


BNB_CONFIGS: dict[str, dict[str, Any]] = {
    # threshold 0: like our Linear8bitLt, no outlier columns kept in fp16 (transformers' default is 6.0)
    "bnb-int8": {"load_in_8bit": True, "llm_int8_threshold": 0.0},
    "bnb-nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
}
"""Quantized methods whose format transformers loads (its bitsandbytes integration), as BitsAndBytesConfig kwargs."""


def _save_bnb(model: GPT, method: str, folder: Path, eot_id: int | None) -> None:
    """A bitsandbytes checkpoint in transformers' own layout (quantization_config in config.json).

    The block linears are handed over as the exact values our bitsandbytes modules compute with, and transformers'
    quantizer (the same bitsandbytes functions, per output row / per 64-value block of each (out, in) weight) maps
    them back to the same codes: NF4 and row-wise int8 are idempotent on their own dequantized values. The token
    embedding and output head, int8 in our checkpoint, are stored dequantized in fp32 (transformers keeps lm_head
    and embeddings unquantized), so the model computes the same function as ours, on a larger file."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from model.quantize import dequantized_model

    with tempfile.TemporaryDirectory() as plain:  # the fp32 model transformers quantizes on load
        to_hf(dequantized_model(model), eot_id).save_pretrained(plain, safe_serialization=True)
        hf = AutoModelForCausalLM.from_pretrained(
            plain, quantization_config=BitsAndBytesConfig(**BNB_CONFIGS[method]), device_map="cpu", dtype=torch.float32
        )
        hf.save_pretrained(folder, safe_serialization=True)


def check_out(source: str | Path, out: str | Path, force: bool, what: str = "the checkpoint",
              inside: bool = False) -> None:
    """Export and import never destroy what they did not write: `out` may not be, contain or sit inside `source` (a
    folder written inside a committed checkpoint breaks its commit record; `inside` allows it for a stage that owns
    both), may not be a file, and must not exist or be empty unless `force`."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src or src.is_relative_to(dst):
        raise ExportError(f"--out {out} is or contains {what} {source}; choose another folder")
    if dst.is_relative_to(src) and not inside:
        raise ExportError(f"--out {out} is inside {what} {source}; choose a folder outside it")
    if dst.exists() and not dst.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder; choose a folder")
    if dst.exists() and not force and any(dst.iterdir()):
        raise ExportError(f"--out {out} already exists and is not empty; choose a new folder or pass --force to replace it")


def export(checkpoint: str | Path, out: str | Path, force: bool = False, inside: bool = False) -> Path:
    """Write config.json, model.safetensors and tokenizer files for transformers; temp folder, then rename.
    Full-precision checkpoints and quantized ones (see the module docstring) can be exported. An existing
    non-empty `out` is replaced only with `force`; `out` may never be or contain the checkpoint. A checkpoint on
    object storage is fetched into the local cache first (`model.checkpoint.local_checkpoint`)."""
    checkpoint = local_checkpoint(checkpoint)
    check_out(checkpoint, out, force, inside=inside)
    method = read_meta(checkpoint).get("quantization", {}).get("method")
    family = architecture(load_config(checkpoint))  # refuse models without a Hugging Face equivalent before any work
    if method is not None and method not in BNB_CONFIGS and family != "llama":
        raise ExportError(
            f"{checkpoint}: a {method} checkpoint of the GPT-2 family; transformers' GPT-2 uses Conv1D layers, which "
            "compressed-tensors does not quantize (export the full-precision checkpoint, or GGUF: --format gguf)"
        )
    loaded = load_checkpoint(checkpoint)
    out = Path(out)
    with atomic_folder(out, replace=True) as tmp:  # check_out allowed replacing it
        if method is None:
            to_hf(loaded.model, loaded.eot_id).eval().save_pretrained(tmp, safe_serialization=True)
        elif method in BNB_CONFIGS:
            _save_bnb(loaded.model, method, tmp, loaded.eot_id)
        else:
            from model.export_compressed import save_compressed  # compressed-tensors: only for these checkpoints

            save_compressed(loaded.model, tmp, loaded.eot_id)
        template = loaded.chat_template
        stops = stop_ids(loaded.tokenizer, loaded.eot_id, template)
        if len(stops) > 1:  # a chat model's `generate` also ends at the end of its turn
            config = GenerationConfig.from_pretrained(tmp)
            config.eos_token_id = stops
            config.save_pretrained(tmp)
        save_hf_tokenizer(hf_tokenizer(loaded.tokenizer_file, loaded.eot_token, template), tmp)
    return out


