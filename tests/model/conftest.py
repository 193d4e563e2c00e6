"""Fixtures of the model tests: a small tokenizer and checkpoints of both exportable architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline.config import TokenizerConfig
from data_pipeline.tokenizer import train_tokenizer
from model.checkpoint import save_checkpoint
from model.gpt import GPT, ModelConfig

ARCHS = {
    "llama": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2),
    "gpt2": dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True),
}


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:200_000]
    tokenizer = train_tokenizer(iter(text.split("\n\n")), TokenizerConfig(vocab_size=300))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def perturbed_model(arch: str, **overrides: object) -> GPT:
    """A small model whose norms and biases are not at their init values, so export mistakes show."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64, **{**ARCHS[arch], **overrides})
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="session", params=list(ARCHS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_file: Path) -> Path:
    folder = tmp_path_factory.mktemp(request.param) / "checkpoint"
    return save_checkpoint(perturbed_model(request.param), folder, tokenizer_file)
