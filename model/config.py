"""The transformer's architecture as data: `ModelConfig`, the named presets, the quantization methods' names, and the
run config's `model` and `sample` sections.

    python -c "from model.config import ModelConfig; print(ModelConfig.preset('llama-7b'))"

Kept apart from model/gpt.py (which re-exports `ModelConfig`) because it needs no torch: the config tools, `raygpt
plan` and the CLI read architectures without importing the training stack (benchmarks/cli_startup.py).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.config import Section


class ModelConfig(BaseModel):
    """Architecture of the transformer; saved as config.json in every checkpoint."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    vocab_size: int = Field(default=50257, ge=1)
    """Number of token ids (the tokenizer's vocabulary size)."""
    block_size: int = Field(default=1024, ge=1)
    """Longest sequence the model attends over (learned/sinusoidal position tables and KV caches have this length)."""
    n_layer: int = Field(default=12, ge=1)
    """Transformer blocks."""
    n_head: int = Field(default=12, ge=1)
    """Query heads per attention layer."""
    n_kv_head: int | None = Field(default=None, ge=1)
    """Key/value heads (grouped-query attention); None means n_head (multi-head attention)."""
    n_embd: int = Field(default=768, ge=1)
    """Width of the residual stream."""
    intermediate_size: int | None = Field(default=None, ge=1)
    """Hidden width of the MLP; None means 4·n_embd for gelu and the Llama rule (⅔·4·n_embd, rounded up to 256) for swiglu."""
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = "learned"
    """Positions: a learned table (GPT-2), the fixed sin/cos table of "Attention Is All You Need", or rotary (Llama)."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """Base of the rotary frequencies (Llama 2: 1e4, Llama 3: 5e5)."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """MLP type: GELU (tanh approximation, as GPT-2) or SwiGLU (gate · up, as Llama)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalization before attention, before the MLP and at the end."""
    norm_eps: float = Field(default=1e-5, gt=0)
    """Epsilon of the norms."""
    bias: bool = True
    """Biases in linear layers and LayerNorms (GPT-2: yes, Llama: no)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings, attention probabilities and residual branches (training only)."""
    tie_embeddings: bool = True
    """The output projection shares the token-embedding matrix."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them (less memory, ~30% more compute)."""
    init_std: float = Field(default=0.02, gt=0)
    """Std of the normal init; residual output projections get init_std / sqrt(2·n_layer) (GPT-2)."""

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.kv_heads}")
        if self.pos_encoding == "rope" and self.head_size % 2:
            raise ValueError("rope needs an even head size")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 256 * math.ceil(int(2 * 4 * self.n_embd / 3) / 256)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named architecture (see PRESETS), with some fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})


_GPT2 = dict(pos_encoding="learned", mlp="gelu", norm="layernorm", bias=True, tie_embeddings=True)
_LLAMA = dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False)
PRESETS: dict[str, dict[str, Any]] = {
    # Tests: every path in milliseconds.
    "debug": dict(**_LLAMA, vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64),
    # The CPU demo: ~7M parameters with an 8k vocabulary.
    "tiny": dict(**_LLAMA, vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256, tie_embeddings=True),
    "gpt2-124m": dict(**_GPT2, vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": dict(**_GPT2, vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    # Llama 3.2 1B.
    "llama-1b": dict(
        **_LLAMA, vocab_size=128256, block_size=8192, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
        intermediate_size=8192, rope_theta=500000.0, tie_embeddings=True,
    ),
    # Llama 2 7B.
    "llama-7b": dict(
        **_LLAMA, vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008,
        tie_embeddings=False,
    ),
}


QUANT_METHODS: dict[str, int] = {"int8": 8, "int4-rtn": 4, "gptq": 4, "awq": 4, "bnb-int8": 8, "bnb-nf4": 4}
"""Post-training quantization methods (model/quantize.py) → bits per weight."""
QuantMethod = Literal[tuple(QUANT_METHODS)]  # type: ignore[valid-type]
GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
"""The GGUF types `raygpt export --format gguf --quant` and `quantize.gguf` write (model/export_gguf.py)."""
GgufQuant = Literal[GGUF_QUANTS]  # type: ignore[valid-type]


INIT_FROM_OVERRIDES = frozenset({"dropout", "activation_checkpointing"})
"""ModelConfig fields that do not change the weights' shapes: the only overrides allowed with model.init_from."""


class ModelSection(Section):
    """The architecture: a preset plus fields replaced; vocab_size comes from the prepared data."""

    preset: str = "tiny"
    """A model.gpt preset: debug, tiny, gpt2-124m, gpt2-350m, llama-1b, llama-7b."""
    overrides: dict[str, Any] = {}
    """ModelConfig fields replacing the preset's (e.g. {n_layer: 6, dropout: 0.1}); block_size defaults to data.seq_len."""
    init_from: str | None = None
    """A raygpt checkpoint (e.g. written by `raygpt import HF_DIR`) to start training from: continued pretraining.
    Its architecture replaces `preset` (overrides may only set dropout and activation_checkpointing) and its weights
    the random init; prepare the data with its tokenizer (data.tokenizer.path: CKPT/tokenizer.json)."""

    @model_validator(mode="after")
    def _resolves(self) -> ModelSection:
        if self.init_from is not None:
            if changed := sorted(set(self.overrides) - INIT_FROM_OVERRIDES):
                raise ValueError(f"model.overrides.{changed[0]}: the architecture comes from model.init_from; only "
                                 f"{' and '.join(sorted(INIT_FROM_OVERRIDES))} may be set")
            return self
        self.resolve(vocab_size=self.overrides.get("vocab_size", 256), block_size=None)
        return self

    def resolve(self, vocab_size: int, block_size: int | None) -> ModelConfig:
        """The model config: the preset with overrides, or the architecture of `init_from` (whose vocabulary and
        context the data must fit: checked by the trainer)."""
        if self.init_from is not None:
            from model.checkpoint import load_config as checkpoint_config  # reads the checkpoint: at train time only

            return ModelConfig.model_validate({**checkpoint_config(self.init_from).model_dump(), **self.overrides})
        fields = {"vocab_size": vocab_size, **({"block_size": block_size} if block_size else {}), **self.overrides}
        return ModelConfig.preset(self.preset, **fields)


class SampleConfig(Section):
    """The last stage of `raygpt run`: a generated sample from the final checkpoint (RUN_DIR/sample.txt)."""

    prompt: str = "def "
    """Text the sample continues."""
    max_new_tokens: int = Field(default=128, ge=1, le=1 << 20)
    """Tokens generated."""
    temperature: float = Field(default=0.8, ge=0, le=100)
    """Sampling temperature; 0 is greedy."""
    top_k: int | None = Field(default=50, ge=1)
    """Sample among the k most likely tokens; None for all."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Sample among the most likely tokens whose probabilities sum to top_p (nucleus sampling); None for all."""
    seed: int = Field(default=0, ge=0, lt=1 << 63)
    """Seed of the sampling."""
    compile: bool = False
    """Decode through torch.compile (model/generate.py): the first call compiles, then each step runs one graph (a
    CUDA graph on a GPU). Measured on a CPU it helps batch-1 decoding of small models only (README)."""
