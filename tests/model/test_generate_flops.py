"""Sampling (greedy, temperature, top-k, top-p, seeds, EOT), the streaming CLI, FLOP counting and MFU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from model.flops import flops_per_token, matmul_params, mfu, peak_flops
from model.generate import _decode_step, filter_logits, generate, generate_tokens, static_length
from model.gpt import GPT, KVCache, ModelConfig
from tests.conftest import perturbed_model

pytestmark = pytest.mark.kernels  # CI runs these again with the CPU ISA forced to AVX2


def test_filter_logits_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, None)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, None, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, None, 0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits, None, 1.0)).any()


def assert_chosen_within(model: GPT, seq: torch.Tensor, start: int, rank: int = 1, atol: float = 1e-4) -> None:
    """Every token of seq (B, T) from position `start` on is among the `rank` most likely under a full forward pass
    without a cache, up to `atol` in the logit: how decoding that ran other kernels (a KV cache, a compiled step) is
    checked, since an exact tie-break between different kernels is not a property of the code."""
    with torch.no_grad():
        logits = model(seq)[0][:, start - 1 : -1]  # (B, new, V): what predicted each chosen token
    chosen = logits.gather(-1, seq[:, start:, None]).squeeze(-1)
    assert (chosen >= logits.topk(rank, dim=-1).values[..., -1] - atol).all()


def test_greedy_is_the_argmax_of_full_forwards() -> None:
    model = perturbed_model("llama")
    prompt = torch.randint(0, 300, (2, 5))
    assert_chosen_within(model, generate(model, prompt, 12), 5)  # cached decoding, checked against no cache


def test_sampling_is_seeded_and_respects_top_k() -> None:
    model = perturbed_model("gpt2")
    prompt = torch.randint(0, 300, (1, 4))
    a = generate(model, prompt, 20, temperature=1.0, top_k=5, seed=3)
    b = generate(model, prompt, 20, temperature=1.0, top_k=5, seed=3)
    c = generate(model, prompt, 20, temperature=1.0, top_k=5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    one = generate(model, prompt, 10, temperature=1.0, top_k=1, seed=5)
    assert torch.equal(one, generate(model, prompt, 10))  # top-k 1 is greedy


def test_stops_at_end_of_text_and_block_size() -> None:
    model = perturbed_model("llama")
    prompt = torch.randint(0, 300, (1, 4))
    greedy = generate(model, prompt, 10)
    eos = int(greedy[0, 6])
    stopped = list(generate_tokens(model, prompt, 10, eos_id=eos))
    assert [t.item() for t in stopped] == greedy[0, 4:].tolist()[: greedy[0, 4:].tolist().index(eos) + 1]
    assert generate(model, torch.zeros(1, 60, dtype=torch.long), 100).shape == (1, 64)  # block_size 64
    with pytest.raises(ValueError, match="leaves no room"):
        generate(model, torch.zeros(1, 64, dtype=torch.long), 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_static_cache_decodes_like_a_growing_one(arch: str) -> None:
    """A static cache (what the compiled step uses) attends over every position, masked: the same logits."""
    model = perturbed_model(arch)
    prompt = torch.randint(0, 300, (3, 7))
    caches = [KVCache(model.cfg, 3, length, torch.device("cpu"), torch.float32, static=static)
              for length, static in ((20, False), (64, True))]
    with torch.no_grad():
        token = [model(prompt, cache=c, start=0)[0][:, -1:].argmax(-1) for c in caches][0]  # (3, 1)
        for pos in range(7, 12):
            positions = torch.full((3,), pos)
            growing, static = (_decode_step(model, token, c, positions) for c in caches)
            torch.testing.assert_close(static, growing, rtol=1e-5, atol=1e-5)
            token = growing.argmax(-1, keepdim=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compiled_decoding_gives_the_eager_tokens(arch: str) -> None:
    """`compile=True` runs the real torch.compile (inductor) step: greedy tokens are the argmax of a full forward
    (within 1e-4: other kernels than eager's), seeded sampling repeats and stays in the top k, a second generation
    of another length in the same bucket reuses the compiled step and its cache, and two live generations do not
    share a cache (interleaved, each gives what it gives alone: the same compiled kernels, so exactly)."""
    model = perturbed_model(arch)
    prompt = torch.randint(0, 300, (2, 5))
    greedy = generate(model, prompt, 20, compile=True)
    assert greedy.shape == (2, 25)
    assert_chosen_within(model, greedy, 5)
    sampled = dict(temperature=1.0, top_k=20, seed=7)
    other = torch.randint(0, 300, (2, 9))  # the reused cache holds the last generation's keys: masked, overwritten
    drawn = generate(model, other, 12, compile=True, **sampled)
    assert torch.equal(drawn, generate(model, other, 12, compile=True, **sampled))
    assert_chosen_within(model, drawn, 9, rank=20)
    assert len(model.__dict__["_static_caches"]) == 1  # both in the 64-position bucket: one cache, one compiled step
    first, second = generate_tokens(model, prompt, 10, compile=True), generate_tokens(model, other, 10, compile=True)
    interleaved = [(int(a[0]), int(b[0])) for a, b in zip(first, second)]  # two live generations: two caches
    assert [a for a, _ in interleaved] == generate(model, prompt, 10, compile=True)[0, 5:].tolist()
    assert [b for _, b in interleaved] == generate(model, other, 10, compile=True)[0, 9:].tolist()
    assert [static_length(n, 1024) for n in (10, 64, 65, 200, 1000, 1024)] == [64, 64, 128, 256, 1024, 1024]
    assert static_length(100, 96) == 96  # never past the context


def test_cli_generate_streams_text(checkpoint: Path, capsys) -> None:
    args = ["generate", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first) > len("ROMEO:\n")
    assert main(args) == 0 and capsys.readouterr().out == first  # greedy is deterministic
    assert main([*args, "--compile"]) == 0  # the compiled step (its tokens are checked in the test above)
    compiled = capsys.readouterr().out
    assert compiled.startswith("ROMEO:") and len(compiled) > len("ROMEO:\n")
    assert main([*args[:-2], "--temperature", "1", "--top-p", "0.9", "--seed", "1"]) == 0


def test_flops_per_token_gpt2_small() -> None:
    cfg = ModelConfig.preset("gpt2-124m")
    with torch.device("meta"):
        model = GPT(cfg)
    # Matmul weights: all parameters minus the position table, norms and biases (the tied wte is the lm_head).
    norms_and_biases = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    assert matmul_params(cfg) == model.num_params() - cfg.block_size * cfg.n_embd - norms_and_biases
    assert flops_per_token(cfg, 1024) == 6 * matmul_params(cfg) + 12 * 12 * 768 * 1024
    assert flops_per_token(cfg, 1024, training=False) == flops_per_token(cfg, 1024) / 3


def test_mfu_uses_measured_cpu_peak_and_refuses_unknown_devices() -> None:
    peak = peak_flops("cpu", torch.float32, threads=1)
    assert peak is not None and 1e9 < peak < 1e13  # measured, cached
    assert peak_flops("cpu", torch.float32, threads=1) == peak
    assert mfu(1000.0, 1e6, 2e9, devices=2) == pytest.approx(0.25)
    assert mfu(1000.0, 1e6, None) is None
    assert peak_flops("meta", torch.float32) is None
    assert math.isfinite(mfu(1.0, 1.0, peak))
