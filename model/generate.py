"""Sampling with a pre-allocated KV cache: prefill the prompt once, then one token per step.

    raygpt generate CHECKPOINT --prompt "def fib(n):" --max-new-tokens 64 --temperature 0.8 --top-k 50 --seed 0

Temperature 0 is greedy decoding. Top-k and top-p (nucleus) filter the distribution before sampling. Generation stops
at the end-of-text token or after max_new_tokens. A batch of prompts of equal length decodes together.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from model.gpt import GPT, KVCache


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
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, (B,), one step at a time. prompt: (B, T) token ids."""
    B, T = prompt.shape
    total = min(T + max_new_tokens, model.cfg.block_size)
    if T >= total:
        raise ValueError(f"prompt of {T} tokens leaves no room under block_size {model.cfg.block_size}")
    generator = torch.Generator(device=prompt.device)
    if seed is not None:
        generator.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, B, total, prompt.device, dtype)
    logits, _ = model(prompt, cache=cache, start=0)  # prefill: (B, T, V)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for pos in range(T, total):
        last = logits[:, -1, :].float()  # (B, V)
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
        logits, _ = model(token[:, None], cache=cache, start=pos)  # (B, 1, V)


def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, **kwargs: object) -> torch.Tensor:
    """The prompt followed by its continuation: (B, T + new)."""
    steps = list(generate_tokens(model, prompt, max_new_tokens, **kwargs))  # type: ignore[arg-type]
    return torch.cat([prompt, torch.stack(steps, dim=1)], dim=1) if steps else prompt
