"""Speed of our model against its Hugging Face export, same weights, same run, fp32 on this machine's CPU threads.

    .venv/bin/python benchmarks/model_speed.py [--new-tokens 256] [--steps 7]

(a) greedy decoding tokens/s: `model.generate` with our pre-allocated KV cache vs `transformers` `generate()`;
(b) training step (forward + backward) tokens/s: our GPT vs the same-shape transformers model.
Both architectures are measured: Llama-style (rope, rmsnorm, swiglu, GQA) and GPT-2-style (learned, layernorm, gelu).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.export import to_hf  # noqa: E402
from model.flops import machine_header  # noqa: E402
from model.generate import generate  # noqa: E402
from model.gpt import GPT, ModelConfig  # noqa: E402

SHAPES = {
    "llama-style": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2),
    "gpt2-style": dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True),
}


def _compare(ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of each, measured alternately (ours, theirs, ours, ...) after two warm-up calls each, so that
    machine noise and warm-up hit both sides alike."""
    for _ in range(2):
        ours(), theirs()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((ours, times[0]), (theirs, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=7, help="measured repeats per side")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    print(f"{machine_header()}\ntorch {torch.__version__}, fp32")
    rows = []
    for name, arch in SHAPES.items():
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=8192, block_size=512, n_layer=6, n_head=8, n_embd=384, **arch)
        ours = GPT(cfg)
        hf = to_hf(ours)
        print(f"{name}: {ours.num_params() / 1e6:.1f}M parameters")

        ours.eval(), hf.eval()
        prompt = torch.randint(0, cfg.vocab_size, (1, 32))
        mask = torch.ones_like(prompt)
        with torch.inference_mode():
            ours_s, hf_s = _compare(
                lambda: generate(ours, prompt, args.new_tokens),
                lambda: hf.generate(
                    prompt, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False, pad_token_id=0,
                ),
                args.steps,
            )
        same = torch.equal(
            generate(ours, prompt, 32),
            hf.generate(prompt, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0),
        )
        rows.append((name, "greedy decode tok/s", args.new_tokens / ours_s, args.new_tokens / hf_s, same))

        ours.train(), hf.train()
        idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
        x, y = idx[:, :-1], idx[:, 1:]

        def ours_step() -> None:
            ours.zero_grad(set_to_none=True)
            ours(x, targets=y)[1].backward()

        def hf_step() -> None:
            hf.zero_grad(set_to_none=True)
            hf(input_ids=x, labels=x).loss.backward()  # same T-token forward; HF shifts the labels itself

        tokens = args.batch * args.seq_len
        ours_s, hf_s = _compare(ours_step, hf_step, args.steps)
        rows.append((name, "train step tok/s", tokens / ours_s, tokens / hf_s, None))

    print()
    print("| model | measure | raygpt | transformers | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name, measure, a, b, same in rows:
        note = "" if same is None else (" (same tokens)" if same else " (DIFFERENT tokens)")
        print(f"| {name} | {measure} | {a:,.0f} | {b:,.0f} | {a / b:.2f}{note} |")


if __name__ == "__main__":
    main()
