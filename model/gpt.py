"""The raygpt transformer, top to bottom in one file: norms, positions, KV cache, attention, MLP, blocks, GPT (its
architecture, `ModelConfig`, and the presets are data in model/config.py, which needs no torch).

    python -c "from model.gpt import GPT, ModelConfig; print(GPT(ModelConfig.preset('tiny', vocab_size=8192)))"

A decoder-only, pre-norm transformer that covers the GPT-2 family (learned positions, LayerNorm, GELU, biases, tied
embeddings) and the Llama family (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases) with one set of modules.
Attention goes through `F.scaled_dot_product_attention`. Incremental decoding uses a pre-allocated `KVCache`.
Shapes: B batch, T time (tokens), C n_embd, nh heads, nkv key/value heads, hs head size, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.config import PRESETS, ModelConfig  # noqa: F401  # re-exported: the architecture as data, torch-free


def norm_layer(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(pos / 10000^(2i/dim)) → (length, dim)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]  # (L, 1)
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table.float()


def rope_tables(length: int, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (length, hs), halves repeated (the Llama / HF `rotate_half` layout)."""
    inv = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv)  # (L, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, hs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, h, T, hs) by position: x·cos + rotate_half(x)·sin, cos/sin (T, hs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Pre-allocated keys and values for incremental decoding: one (B, nkv, max_len, hs) tensor per layer in `k` and
    `v` (separate tensors, not views of one: a compiled decode step then updates them in place instead of copying).
    Row b holds one sequence. `rows(i, j)` is a view of rows i..j on the same storage, so one sequence can be
    prefilled into its row while the others decode (continuous batching, model/batching.py)."""

    def __init__(
        self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype, static: bool = False
    ) -> None:
        shape = (batch, cfg.kv_heads, max_len, cfg.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.static = static
        """Per-row decoding attends over all max_len positions (masked) instead of up to the furthest row: shapes
        that do not depend on the positions, so a compiled decode step (`model.generate`) compiles once."""
        self.in_use = False
        """Held by a generation (`model.generate` reuses static caches between generations, never during one)."""

    def rows(self, begin: int, end: int) -> KVCache:
        view = object.__new__(KVCache)
        view.k, view.v, view.static = [t[begin:end] for t in self.k], [t[begin:end] for t in self.v], self.static
        return view

    def update(
        self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) at positions start..start+T; return all keys/values up to there. With a tensor
        `start` (B,), T is 1 and row b's token goes to position start[b]; keys/values up to the furthest row return
        (all max_len positions when static)."""
        keys, values = self.k[layer], self.v[layer]  # (B, nkv, max_len, hs)
        if isinstance(start, torch.Tensor):
            at = start[:, None, None, None].expand(k.shape)  # (B, nkv, 1, hs): row b's token to position start[b]
            keys.scatter_(2, at, k)
            values.scatter_(2, at, v)
            end = keys.shape[2] if self.static else int(start.max()) + 1
        else:
            end = start + k.shape[2]
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hs = cfg.head_size
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * hs, bias=cfg.bias)  # fused q, k, v
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True  # type: ignore[assignment]  # scaled init
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None,
        start: int | torch.Tensor, doc_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        nh, nkv, hs = self.cfg.n_head, self.cfg.kv_heads, self.cfg.head_size
        q, k, v = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)  # (B, nkv, start+T, hs)
        S = k.shape[2]
        if doc_mask is not None:  # packed documents: causal within each, nothing across (B, 1, T, T)
            mask, causal = doc_mask, False
        elif isinstance(start, torch.Tensor):  # row b's one token sees its own prefix only: positions ≤ start[b]
            mask = (torch.arange(S, device=x.device) <= start[:, None])[:, None, None, :]  # (B, 1, 1, S)
            causal = False
        elif T == S:  # no cached prefix: plain causal attention
            mask, causal = None, True
        elif T == 1:  # one new token attends to everything before it
            mask, causal = None, False
        else:  # a chunk after a cached prefix: token i sees positions ≤ start + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.cfg.dropout if self.training else 0.0, enable_gqa=nkv != nh,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.hidden_size
        self.up = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias) if self.swiglu else None
        self.down = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.down.residual = True  # type: ignore[assignment]  # scaled init
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) → (B, T, C)
        if self.gate is not None:
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, hidden)
        else:
            h = F.gelu(self.up(x), approximate="tanh")  # (B, T, hidden)
        return self.dropout(self.down(h))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1, self.attn = norm_layer(cfg), Attention(cfg, layer)
        self.norm2, self.mlp = norm_layer(cfg), MLP(cfg)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None,
        start: int | torch.Tensor, doc_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cache, start, doc_mask)
        return x + self.mlp(self.norm2(x))


def position_tables(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The fixed position buffers, computed rather than saved: sinusoidal `pe` (block, C) or rope's `rope_cos` /
    `rope_sin`; none for learned positions."""
    if cfg.pos_encoding == "sinusoidal":
        return {"pe": sinusoidal_table(cfg.block_size, cfg.n_embd)}
    if cfg.pos_encoding == "rope":
        cos, sin = rope_tables(cfg.block_size, cfg.head_size, cfg.rope_theta)
        return {"rope_cos": cos, "rope_sin": sin}
    return {}


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Under `torch.device("meta")` (a skeleton that model.checkpoint loads a quantized file into) nothing is drawn:
        # the tables are given empty, since nn.Embedding's own init on meta imports ~70 MiB of PyTorch's decompositions
        # (as float64 math on meta does: the position tables below are computed on the CPU)
        skeleton = torch.empty(0).device.type == "meta"

        def table(rows: int) -> nn.Embedding:
            return nn.Embedding(rows, cfg.n_embd, _weight=torch.empty(rows, cfg.n_embd) if skeleton else None)

        self.wte = table(cfg.vocab_size)
        self.wpe = table(cfg.block_size) if cfg.pos_encoding == "learned" else None
        with torch.device("cpu"):  # computed, never loaded: real even in a meta skeleton (model.checkpoint)
            tables = position_tables(cfg)
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = norm_layer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if not skeleton:
            self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2·n_layer)."""
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "residual", False) else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameters (shared tensors once); without the embedding tables if asked (the 6N of FLOP counts)."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def embed(
        self, idx: torch.Tensor, start: int | torch.Tensor = 0, positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """idx (B, T) at positions start..start+T → the input of the first block (B, T, C) and the rope tables the
        blocks rotate with ((T, hs), or (B, 1, T', hs) for per-row positions; None unless rope). A tensor `start` (B,)
        gives each row its own position (batched decoding, T = 1); `positions` (B, T) gives every token its own
        (packed documents, each from 0). Also used by GPTQ/AWQ calibration."""
        B, T = idx.shape
        per_row = isinstance(start, torch.Tensor) or positions is not None
        if positions is not None:
            last = T - 1  # a document's positions never exceed the block's
        elif isinstance(start, torch.Tensor):
            if T != 1:
                raise ValueError(f"per-row positions decode one token per row, not {T}")
            # under torch.compile the caller keeps positions in range: reading them here would sync and break the graph
            positions, last = start[:, None], -1 if torch.compiler.is_compiling() else int(start.max())  # (B, 1)
        else:
            positions, last = slice(start, start + T), start + T - 1
        if last >= self.cfg.block_size:
            raise ValueError(f"sequence of {last + 1} tokens exceeds block_size {self.cfg.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe.weight[positions]
        elif self.cfg.pos_encoding == "sinusoidal":
            x = x + self.pe[positions].to(x.dtype)
        x = self.drop(x)
        rope = None
        if self.cfg.pos_encoding == "rope":
            cos, sin = self.rope_cos[positions].to(x.dtype), self.rope_sin[positions].to(x.dtype)  # (T | B, 1 | B, T, hs)
            rope = (cos[:, None], sin[:, None]) if per_row else (cos, sin)  # per row: (B, 1, 1 | T, hs)
        return x, rope

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        segments: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids at positions start..start+T → logits (B, T, V) and, given targets (B, T), the
        cross-entropy over the targets that are not -1: their mean, or with reduction="sum" their sum. With a cache,
        keys/values of earlier positions come from it and these are added to it; a tensor `start` (B,) decodes one
        token per row, row b at position start[b] over its own cached prefix. `segments` (B, T), nondecreasing
        document numbers of packed documents (training): a token attends only to earlier tokens of its own document
        and positions restart at each document, so each is seen as if it were alone (as at inference)."""
        doc_mask = positions = None
        if segments is not None:
            T = idx.shape[1]
            here = torch.arange(T, device=idx.device)  # (T,)
            doc_mask = (segments[:, :, None] == segments[:, None, :]) & (here[:, None] >= here[None, :])  # (B, T, T)
            doc_mask = doc_mask[:, None]  # (B, 1, T, T)
            begins = torch.ones_like(segments, dtype=torch.bool)
            begins[:, 1:] = segments[:, 1:] != segments[:, :-1]  # (B, T): a document's first token
            positions = here - torch.where(begins, here, 0).cummax(dim=1).values  # (B, T): from 0 in each document
        x, rope = self.embed(idx, start, positions)  # (B, T, C)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, cache, start, doc_mask, use_reentrant=False)
            else:
                x = block(x, rope, cache, start, doc_mask)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction=reduction)
        return logits, loss
