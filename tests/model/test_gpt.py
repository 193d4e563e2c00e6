"""The transformer: shapes, causality, every variant learns, presets match published sizes, KV cache = full forward."""

from __future__ import annotations

import math

import pytest
import torch

from model.gpt import GPT, PRESETS, KVCache, ModelConfig, sinusoidal_table

VARIANTS = {
    "gpt2": dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True),
    "sinusoidal": dict(pos_encoding="sinusoidal", norm="layernorm", mlp="gelu", bias=False, tie_embeddings=False),
    "llama-gqa": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2),
    "llama-mqa-bias": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=True, n_kv_head=1),
    "rope-layernorm-gelu": dict(pos_encoding="rope", norm="layernorm", mlp="gelu", rope_theta=500000.0),
}


def _small(**kw: object) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 97, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32, **kw})


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_and_loss(name: str) -> None:
    model = GPT(_small(**VARIANTS[name]))
    idx, targets = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    logits, loss = model(idx, targets=targets)
    assert logits.shape == (3, 20, 97)
    assert loss is not None and abs(loss.item() - math.log(97)) < 0.5  # near uniform at init
    assert model(idx)[1] is None


@pytest.mark.parametrize("name", VARIANTS)
def test_causality(name: str) -> None:
    model = GPT(_small(**VARIANTS[name])).eval()
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_overfits_a_toy_batch(name: str) -> None:
    torch.manual_seed(0)
    model = GPT(_small(**VARIANTS[name]))
    idx = torch.randint(0, 97, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_decoding_equals_full_forward(name: str) -> None:
    model = GPT(_small(**VARIANTS[name])).eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache(model.cfg, 2, 20, torch.device("cpu"), torch.float32)
        steps = [model(idx[:, :8], cache=cache, start=0)[0]]  # prefill 8
        steps.append(model(idx[:, 8:12], cache=cache, start=8)[0])  # a chunk of 4 after a cached prefix
        steps += [model(idx[:, t : t + 1], cache=cache, start=t)[0] for t in range(12, 20)]  # one at a time
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = GPT(_small(**VARIANTS["llama-gqa"]))
    ckpt = GPT(_small(**VARIANTS["llama-gqa"], activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    for m in (plain, ckpt):
        m(idx, targets=idx)[1].backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_documents_are_seen_as_if_alone(name: str) -> None:
    """`segments`: three documents packed in one row give each document's logits of a forward on it alone (attention
    inside the document, positions from 0: learned, sinusoidal and rope alike), also under activation checkpointing;
    reduction="sum" with -1 targets sums exactly the kept tokens' losses, and an all -1 batch sums to 0 (not NaN)."""
    torch.manual_seed(0)
    model = GPT(_small(**VARIANTS[name], activation_checkpointing=True)).eval()
    docs = [torch.randint(0, 97, (1, n)) for n in (7, 12, 9)]
    packed = torch.cat(docs, dim=1)  # (1, 28)
    segments = torch.cat([torch.full((1, len(d[0])), i) for i, d in enumerate(docs)], dim=1)
    with torch.no_grad():
        together = model(packed, segments=segments)[0]
        alone = torch.cat([model(d)[0] for d in docs], dim=1)
    assert (together - alone).abs().max() < 1e-5
    model.train()  # dropout 0: the same function, through activation checkpointing
    assert (model(packed, segments=segments)[0] - alone).abs().max() < 1e-5
    targets = torch.where(torch.rand(1, 28) < 0.5, packed, -1)
    logits, total = model(packed, targets=targets, segments=segments, reduction="sum")
    kept = targets[0] >= 0
    manual = torch.nn.functional.cross_entropy(logits[0][kept], targets[0][kept], reduction="sum")
    assert torch.allclose(total, manual, rtol=1e-5)
    assert model(packed, targets=torch.full_like(packed, -1), reduction="sum")[1].item() == 0.0


def test_init_scales_residual_projections_and_ties_embeddings() -> None:
    torch.manual_seed(0)
    model = GPT(_small(n_layer=8, n_embd=256, n_head=4))
    assert model.lm_head.weight is model.wte.weight
    assert abs(model.blocks[0].mlp.up.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.down.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert GPT(_small(tie_embeddings=False)).lm_head.weight is not GPT(_small()).wte.weight


PUBLISHED = {  # parameter counts of the reference implementations
    "gpt2-124m": 124_439_808,  # GPT-2 small (HF gpt2), tied, vocab 50257
    "gpt2-350m": 354_823_168,  # GPT-2 medium
    "llama-1b": 1_235_814_400,  # Llama 3.2 1B
    "llama-7b": 6_738_415_616,  # Llama 2 7B
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = GPT(ModelConfig.preset(name))
    assert model.num_params() == PUBLISHED[name]


def test_presets_and_config_validation() -> None:
    assert set(PRESETS) == {"debug", "tiny", *PUBLISHED}
    assert ModelConfig.preset("tiny", vocab_size=100).vocab_size == 100
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="not divisible by n_head"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="not divisible by n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3, n_embd=32)
    with pytest.raises(ValueError, match="Extra inputs"):
        ModelConfig(n_embed=3)
    assert ModelConfig(mlp="swiglu", n_embd=4096, n_head=32).hidden_size == 11008  # the Llama rule
    with pytest.raises(ValueError, match="exceeds block_size"):
        GPT(_small())(torch.zeros(1, 33, dtype=torch.long))


def test_sinusoidal_table_is_the_2017_formula() -> None:
    table = sinusoidal_table(50, 16)
    pos, i = 7, 3
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)
