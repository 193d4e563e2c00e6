"""Export a raygpt checkpoint to GGUF, the file llama.cpp and Ollama run: `raygpt export CKPT --format gguf`.

    raygpt export runs/demo/checkpoint --format gguf --quant q8_0 --out /tmp/demo-q8_0.gguf
    python -c "from llama_cpp import Llama; print(Llama('/tmp/demo-q8_0.gguf').tokenize(b'def f():'))"

Written with llama.cpp's own writer package (`gguf`), with the tensor names and metadata keys its converter
(`convert_hf_to_gguf.py`) writes for the two families `model.export.architecture` maps to:
  rope + rmsnorm + swiglu → `llama` (q and k rows permuted from the rotate-half layout to llama.cpp's interleaved one,
                            as the converter does for Hugging Face Llama weights; GQA kept; tied output omitted)
  learned | sinusoidal + layernorm + gelu → `gpt2` (fused qkv; a sinusoidal table becomes position_embd; llama.cpp's
                            gpt2 needs biases, so bias=false writes zeros)
The tokenizer goes in as llama.cpp's byte-level BPE (`tokenizer.ggml.model = gpt2`, pre-tokenizer `gpt-2`, which is
the regex raygpt's BPE trainer uses): vocabulary, merges, special tokens as control tokens, end-of-text as bos/eos,
no BOS added. The context length is the model's block size.

Quantization (`--quant`): f32 / f16 store every matrix so; q8_0 / q4_0 quantize the matrices with `gguf.quants`
(blocks of 32 along each row, so every row length must be a multiple of 32; q4_0 keeps the token embedding and
output head in q8_0, as llama.cpp's own quantizer keeps them at higher precision); q4_k_m is llama.cpp's quantizer
(`llama_model_quantize` through `llama-cpp-python`, the `gguf` extra) run on the f16 file. Vectors (norms, biases)
stay f32. A quantized raygpt checkpoint is refused: GGUF quantizes from full precision.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import files
from core.chat import END
from model.checkpoint import load_checkpoint
from model.config import GGUF_QUANTS
from model.export import ExportError, architecture
from model.gpt import GPT, sinusoidal_table

BLOCK = 32
"""Row elements per q8_0 / q4_0 block."""


def export_gguf(checkpoint: str | Path, out: Path, quant: str = "f16", force: bool = False) -> Path:
    """Write `checkpoint` as one GGUF file at `out`: built in a temporary folder beside it, then written through
    `core.files.output` (a temporary name renamed when complete), so `out` is the old file (or nothing) or the new
    one, never half of it."""
    if quant not in GGUF_QUANTS:
        raise ExportError(f"unknown --quant {quant!r} (known: {', '.join(GGUF_QUANTS)})")
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    if out.is_dir():
        raise ExportError(f"{out} is a folder; --out names the .gguf file to write")
    loaded = load_checkpoint(checkpoint)
    if loaded.quantization is not None:
        raise ExportError(f"{checkpoint} is quantized ({loaded.quantization['method']}); export the full-precision "
                          "checkpoint and let --quant quantize it")
    arch = architecture(loaded.config)
    tensors = (_llama_tensors if arch == "llama" else _gpt2_tensors)(loaded.model)
    types = {name: _qtype(name, array, quant) for name, array in tensors.items()}  # shape errors before any write
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        written = Path(tmp) / ("f16-source.gguf" if quant == "q4_k_m" else "model.gguf")
        _write(written, loaded, arch, tensors, types, "f16" if quant == "q4_k_m" else quant)
        if quant == "q4_k_m":
            written = _llama_cpp_quantize(written, Path(tmp) / "model.gguf", 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        with open(written, "rb") as source, files.output(out) as target:  # renamed into place once complete
            shutil.copyfileobj(source, target, 16 << 20)
    return out


def _write(path: Path, loaded: Any, arch: str, tensors: dict[str, np.ndarray], types: dict[str, Any],
           quant: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, loaded, arch, quant)
    for name, array in tensors.items():
        qtype = types[name]
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _qtype(name: str, array: np.ndarray, quant: str) -> Any:
    """The GGML type of one tensor: vectors f32; matrices as `quant` asks (q4_0's embedding and head in q8_0)."""
    from gguf import GGMLQuantizationType as T

    if array.ndim == 1 or quant == "f32":
        return T.F32
    if quant in ("f16", "q4_k_m"):  # q4_k_m: llama.cpp's quantizer starts from the f16 file
        return T.F16
    if array.shape[-1] % BLOCK:
        raise ExportError(f"{quant} needs rows whose length is a multiple of {BLOCK}; {name} has rows of "
                          f"{array.shape[-1]} (use --quant f16)")
    if quant == "q4_0" and name.split(".")[0] not in ("token_embd", "output", "position_embd"):
        return T.Q4_0
    return T.Q8_0


def _metadata(writer: Any, loaded: Any, arch: str, quant: str) -> None:
    import gguf

    cfg = loaded.config
    writer.add_name(Path(str(loaded.folder)).resolve().parent.name or "raygpt")
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.hidden_size)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_size)
        writer.add_key_length(cfg.head_size)
        writer.add_value_length(cfg.head_size)
    else:
        writer.add_layer_norm_eps(cfg.norm_eps)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q4_k_m": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0",
                  "q4_0": "MOSTLY_Q4_0"}
    writer.add_file_type(int(gguf.LlamaFileType[file_types[quant]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, loaded)


def _tokenizer(writer: Any, loaded: Any) -> None:
    """The checkpoint's byte-level BPE as llama.cpp's `gpt2` tokenizer model."""
    import json

    import gguf

    spec = json.loads(Path(loaded.tokenizer_file).read_text())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise ExportError("GGUF export needs the byte-level BPE tokenizer (data.tokenizer.type: bpe); this "
                          f"checkpoint has a {model.get('type')} tokenizer")
    vocab: dict[str, int] = model["vocab"]
    for added in spec.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ExportError("the tokenizer's ids are not 0..n-1; GGUF needs a dense vocabulary")
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    eot = vocab[loaded.eot_token]
    writer.add_bos_token_id(eot)
    writer.add_eos_token_id(eot)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if (template := loaded.chat_template) is not None:  # llama.cpp's chat formatting reads it (ChatML by name)
        writer.add_chat_template(template)
        if END in vocab:  # a turn ends generation in llama.cpp's chat
            writer.add_eot_token_id(vocab[END])


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k (heads·hs, ...) from the rotate-half rope layout to llama.cpp's interleaved one (the
    converter's `LlamaModel.permute`)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_tensors(model: GPT) -> dict[str, np.ndarray]:
    cfg = model.cfg
    hs, nh, nkv = cfg.head_size, cfg.n_head, cfg.kv_heads
    out = {"token_embd.weight": _numpy(model.wte.weight), "output_norm.weight": _numpy(model.norm_f.weight)}
    if not cfg.tie_embeddings:
        out["output.weight"] = _numpy(model.lm_head.weight)
    for i, block in enumerate(model.blocks):
        p = f"blk.{i}."
        attn, mlp = block.attn, block.mlp
        for kind in ("weight", "bias"):
            fused = getattr(attn.qkv, kind)
            if fused is None:
                continue
            q, k, v = fused.split([nh * hs, nkv * hs, nkv * hs])
            out[p + f"attn_q.{kind}"] = _numpy(_permute(q, nh))
            out[p + f"attn_k.{kind}"] = _numpy(_permute(k, nkv))
            out[p + f"attn_v.{kind}"] = _numpy(v)
        out[p + "attn_norm.weight"] = _numpy(block.norm1.weight)
        out[p + "ffn_norm.weight"] = _numpy(block.norm2.weight)
        _linear(out, p + "attn_output", attn.proj)
        for ours, theirs in (("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")):
            _linear(out, p + theirs, getattr(mlp, ours))
    return out


def _gpt2_tensors(model: GPT) -> dict[str, np.ndarray]:
    cfg = model.cfg
    positions = model.wpe.weight if model.wpe is not None else sinusoidal_table(cfg.block_size, cfg.n_embd)
    out = {"token_embd.weight": _numpy(model.wte.weight), "position_embd.weight": _numpy(positions)}
    _norm(out, "output_norm", model.norm_f, cfg.n_embd)
    if not cfg.tie_embeddings:
        out["output.weight"] = _numpy(model.lm_head.weight)
    for i, block in enumerate(model.blocks):
        p = f"blk.{i}."
        _norm(out, p + "attn_norm", block.norm1, cfg.n_embd)
        _norm(out, p + "ffn_norm", block.norm2, cfg.n_embd)
        for ours, theirs in ((block.attn.qkv, "attn_qkv"), (block.attn.proj, "attn_output"),
                             (block.mlp.up, "ffn_up"), (block.mlp.down, "ffn_down")):
            _linear(out, p + theirs, ours, zero_bias=True)
    return out


def _linear(out: dict[str, np.ndarray], name: str, linear: torch.nn.Linear, zero_bias: bool = False) -> None:
    out[f"{name}.weight"] = _numpy(linear.weight)
    if linear.bias is not None or zero_bias:
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.weight.shape[0])
        out[f"{name}.bias"] = _numpy(bias)


def _norm(out: dict[str, np.ndarray], name: str, norm: torch.nn.Module, dim: int) -> None:
    out[f"{name}.weight"] = _numpy(norm.weight)
    bias = getattr(norm, "bias", None)
    out[f"{name}.bias"] = _numpy(bias if bias is not None else torch.zeros(dim))


def _llama_cpp_quantize(source: Path, target: Path, ftype: int) -> Path:
    """llama.cpp's own quantizer (`llama_model_quantize`, through llama-cpp-python) from `source` to `target`."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError("--quant q4_k_m runs llama.cpp's quantizer: pip install 'raygpt[gguf]' (llama-cpp-python)"
                          ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    # Its per-tensor lines (log callback and plain stderr) are not for the console: the C library's stderr goes to a
    # file for the call, and its last lines into the error if it fails.
    chatter = logging.getLogger("llama-cpp-python")  # the binding prints llama.cpp's log at this logger's level
    level, saved = chatter.level, os.dup(2)
    chatter.setLevel(logging.ERROR)
    with tempfile.TemporaryFile() as log:
        try:
            sys.stderr.flush()
            os.dup2(log.fileno(), 2)
            failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            chatter.setLevel(level)
        if failed:
            log.seek(0)
            last = log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise ExportError(f"llama.cpp's quantizer failed on {source.name}: {last[0]}")
    return target
