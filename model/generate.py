"""Sampling with a pre-allocated KV cache: prefill the prompt once, then one token per step.

    raygpt generate CHECKPOINT --prompt "def fib(n):" --max-new-tokens 64 --temperature 0.8 --top-k 50 --seed 0

Temperature 0 is greedy decoding. Top-k and top-p (nucleus) filter the distribution before sampling. Generation stops
at the end-of-text token or after max_new_tokens. A batch of prompts of equal length decodes together.

`compile=True` (`raygpt generate --compile`, `sample.compile`) decodes through `torch.compile`: the prompt is
prefilled eagerly, then every one-token step runs one compiled graph over a static KV cache (`KVCache(static=True)`:
positions are a tensor and the attention is masked over the whole cache, so the shapes never change during a
generation). The cache length is the generation's length rounded up to a power of two (`static_length`), so the step
compiles once per batch size, dtype and length bucket; the first call pays the compile. On a GPU the cache tensors
are marked as static addresses and the step is captured as a CUDA graph (mode "reduce-overhead", as gpt-fast and
transformers' static cache do): decoding a small model there is bound by kernel launches, which the graph removes.
`benchmarks/decode_compile.py` measures compiled against eager decoding in one run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from model.gpt import GPT, KVCache

DecodeStep = Callable[[torch.Tensor, KVCache, torch.Tensor], torch.Tensor]


def _decode_step(model: GPT, token: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
    """One token per row (B, 1) at positions (B,) → the next-token logits (B, V)."""
    return model(token, cache=cache, start=positions)[0][:, -1]


def compiled_decoder(model: GPT) -> DecodeStep:
    """The model's decode step under torch.compile, made once per model and device kind and kept on the model
    (recompiled by torch only when the batch size, dtype or cache length changes); a CUDA graph on a GPU."""
    kind = next(model.parameters()).device.type
    steps: dict[str, Any] = model.__dict__.setdefault("_compiled_decode", {})
    if kind not in steps:
        if kind == "cuda":
            compiled = torch.compile(_decode_step, dynamic=False, mode="reduce-overhead")
        else:
            compiled = torch.compile(_decode_step, dynamic=False, options=_cpu_options())
        steps[kind] = lambda token, cache, positions: compiled(model, token, cache, positions)
    return steps[kind]


def _cpu_options() -> dict[str, Any]:
    """Inductor's options on this CPU. Where it would vectorize with AVX2, its vector code is off (`cpp.simdlen` 1):
    torch 2.13's AVX2 code for this step gave wrong tokens (every step after the first an id 0, against the eager
    argmax; AVX-512 and scalar code are right; tests/model/test_generate_flops.py with the ISA forced to AVX2).
    The matmuls are library calls either way; only the small fused element-wise kernels lose their vectors."""
    from torch._inductor import cpu_vec_isa

    return {"cpp.simdlen": 1} if str(cpu_vec_isa.pick_vec_isa()) == "avx2" else {}


def static_cache(model: GPT, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> KVCache:
    """The model's static KV cache of this shape, made once and reused by later generations (kept on the model).
    Reuse is what lets the compiled step run again without recompiling: on a GPU its tensors are marked as static
    addresses (a CUDA graph replays fixed addresses, and torch.compile guards on them). Stale entries need no
    clearing: the prefill overwrites positions 0..T and the mask hides every position after the current one. While
    a generation holds it (`in_use`), another one on the same model gets a cache of its own."""
    caches: dict[tuple[Any, ...], KVCache] = model.__dict__.setdefault("_static_caches", {})
    key = (batch, length, str(device), dtype)
    if key in caches and caches[key].in_use:
        return KVCache(model.cfg, batch, length, device, dtype, static=True)  # interleaved generations: not shared
    if key not in caches:
        cache = caches[key] = KVCache(model.cfg, batch, length, device, dtype, static=True)
        if torch.device(device).type == "cuda":
            for t in (*cache.k, *cache.v):
                torch._dynamo.mark_static_address(t)
    return caches[key]


def static_length(total: int, block_size: int) -> int:
    """The static cache length for a generation of `total` positions: the next power of two (at least 64), at most
    the context. Few buckets (few compiles), and at most 2x the attention a cache of exactly `total` would need."""
    return min(block_size, max(64, 1 << (total - 1).bit_length()))


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top_p; the rest become -inf. (B, V)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is full
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, (B,), one step at a time. prompt: (B, T) token ids. `compile`: the
    decode steps run `compiled_decoder(model)` (see the module docstring)."""
    B, T = prompt.shape
    total = min(T + max_new_tokens, model.cfg.block_size)
    if T >= total:
        raise ValueError(f"prompt of {T} tokens leaves no room under block_size {model.cfg.block_size}")
    generator = torch.Generator(device=prompt.device)
    if seed is not None:
        generator.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    step = compiled_decoder(model) if compile else None
    if compile:
        cache = static_cache(model, B, static_length(total, model.cfg.block_size), prompt.device, dtype)
    else:
        cache = KVCache(model.cfg, B, total, prompt.device, dtype)
    cache.in_use = True  # a reused static cache is this generation's until it ends
    try:
        logits = model(prompt, cache=cache, start=0)[0][:, -1]  # prefill: (B, V)
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        for pos in range(T, total):
            last = logits.float()  # (B, V)
            if temperature <= 0:
                token = last.argmax(dim=-1)
            else:
                probs = filter_logits(last / temperature, top_k, top_p).softmax(dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done |= token == eos_id
            yield token
            if done.all() or pos + 1 == total:
                return
            if step is not None:
                logits = step(token[:, None], cache, torch.full((B,), pos, device=prompt.device))  # (B, V)
            else:
                logits = model(token[:, None], cache=cache, start=pos)[0][:, -1]  # (B, V)
    finally:
        cache.in_use = False


def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, **kwargs: object) -> torch.Tensor:
    """The prompt followed by its continuation: (B, T + new)."""
    steps = list(generate_tokens(model, prompt, max_new_tokens, **kwargs))  # type: ignore[arg-type]
    return torch.cat([prompt, torch.stack(steps, dim=1)], dim=1) if steps else prompt
