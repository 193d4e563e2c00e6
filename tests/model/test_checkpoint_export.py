"""Checkpoint round trip, bad folders, and Hugging Face export parity (logits and greedy generations)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.cli import main
from core.errors import RunFileError
from data_pipeline.config import TokenizerConfig
from data_pipeline.tokenizer import train_tokenizer
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.export import ExportError, architecture, export
from model.generate import generate
from model.gpt import GPT, ModelConfig
from tests.conftest import perturbed_model


def test_round_trip_is_exact(checkpoint: Path) -> None:
    loaded = load_checkpoint(checkpoint)
    model, cfg, tokenizer = loaded.model, loaded.config, loaded.tokenizer_file
    assert tokenizer == checkpoint / "tokenizer.json"
    state = load_file(str(checkpoint / "model.safetensors"))
    assert ("lm_head.weight" in state) == (not cfg.tie_embeddings)
    arch = "llama" if cfg.pos_encoding == "rope" else "gpt2"
    original = perturbed_model(arch)
    for (name, a), b in zip(original.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    if cfg.tie_embeddings:
        assert model.lm_head.weight is model.wte.weight
    assert not list(checkpoint.parent.glob("*.tmp"))


def _broken(checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    return copy


def test_bad_checkpoint_folders(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "nope")
    missing = _broken(checkpoint, tmp_path / "a")
    (missing / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer.json"):
        load_checkpoint(missing)
    corrupt = _broken(checkpoint, tmp_path / "b")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * (corrupt / "model.safetensors").stat().st_size)
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        load_checkpoint(corrupt)
    wrong = _broken(checkpoint, tmp_path / "c")
    meta = json.loads((wrong / "config.json").read_text())
    meta["model"]["n_embd"] = 128
    (wrong / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"wte.weight has shape \(300, 64\), the config needs \(300, 128\)"):
        load_checkpoint(wrong)
    bad_cfg = _broken(checkpoint, tmp_path / "d")
    (bad_cfg / "config.json").write_text('{"model": {"n_layer": -1}}')
    with pytest.raises(CheckpointError, match="model.n_layer: Input should be greater than or equal to 1"):
        load_checkpoint(bad_cfg)
    extra = _broken(checkpoint, tmp_path / "e")
    state = load_file(str(extra / "model.safetensors"))
    save_file({**state, "stray": torch.zeros(1)}, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor stray"):
        load_checkpoint(extra)
    truncated = _broken(checkpoint, tmp_path / "f")
    (truncated / "config.json").write_text((truncated / "config.json").read_text()[:40])
    with pytest.raises(CheckpointError, match=r"config.json: corrupt checkpoint config, not valid JSON"):
        load_checkpoint(truncated)


def test_the_tokenizer_must_fit_the_model(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """A malformed tokenizer.json, or one whose vocabulary differs from the model's (ids out of range, or tokens the
    model can never produce), is refused when the checkpoint is loaded — one line, before any generation."""
    malformed = _broken(checkpoint, tmp_path / "a")
    (malformed / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(CheckpointError, match="tokenizer.json: not a valid tokenizers file"):
        load_checkpoint(malformed)
    for name, vocab in (("smaller", 280), ("larger", 400)):
        other = _broken(checkpoint, tmp_path / name)
        text = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen liquor jugs " * 20]
        train_tokenizer(iter(text * 50), TokenizerConfig(vocab_size=vocab)).save(str(other / "tokenizer.json"))
        assert main(["generate", str(other), "--prompt", "the"]) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(r"raygpt: error: .*tokenizer.json: the tokenizer has \d+ tokens but the model's vocab_size "
                            r"is 300\n", err), err


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path: Path, capsys) -> None:
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == f"raygpt: error: {tmp_path}: missing model.safetensors\n"


@pytest.mark.kernels  # generation: CI reruns it with the ISA forced to AVX2
def test_export_parity_with_transformers(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    loaded = load_checkpoint(checkpoint)
    ours, cfg = loaded.model, loaded.config
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if cfg.pos_encoding == "rope" else "GPT2LMHeadModel")
    torch.manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (3, 48))
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4
    prompt = idx[:2, :6]
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False, pad_token_id=0
    )
    assert torch.equal(generate(ours, prompt, 30), expected)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.decode(tokenizer("To be, or not to be")["input_ids"]) == "To be, or not to be"


@pytest.mark.parametrize(
    "overrides",
    [dict(pos_encoding="sinusoidal", bias=False, tie_embeddings=False), dict(bias=True, tie_embeddings=False)],
    ids=["gpt2-sinusoidal-nobias", "llama-bias-untied"],
)
def test_export_faithful_mappings(overrides: dict, tmp_path: Path, tokenizer_file: Path) -> None:
    arch = "gpt2" if "pos_encoding" in overrides else "llama"
    model = perturbed_model(arch, **overrides)
    out = export(save_checkpoint(model, tmp_path / "ckpt", tokenizer_file), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_configs_without_an_hf_equivalent_are_refused() -> None:
    with pytest.raises(ExportError, match="no Hugging Face equivalent for pos_encoding=rope, norm=layernorm"):
        architecture(ModelConfig(pos_encoding="rope", norm="layernorm", mlp="gelu"))
    with pytest.raises(ExportError, match="GPT-2 has no grouped-query attention"):
        architecture(ModelConfig(n_kv_head=4))


def test_save_is_atomic_and_replaces_only_when_asked(tmp_path: Path, tokenizer_file: Path) -> None:
    model = GPT(ModelConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16))
    folder = save_checkpoint(model, tmp_path / "c", tokenizer_file, extra={"step": 3})
    with pytest.raises(RunFileError, match="already exists"):
        save_checkpoint(model, folder, tokenizer_file, extra={"step": 4})
    assert json.loads((folder / "config.json").read_text())["step"] == 3
    save_checkpoint(model, folder, tokenizer_file, extra={"step": 4}, replace=True)
    assert json.loads((folder / "config.json").read_text())["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_export_never_destroys_what_it_did_not_write(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """--out may not be or contain the checkpoint (refused with one line, checkpoint intact); an existing non-empty
    folder is replaced only with --force; an empty one is fine."""
    ckpt = _broken(checkpoint, tmp_path)  # a private copy
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    for out in (ckpt, tmp_path):  # the checkpoint itself, and a folder holding it
        assert main(["export", str(ckpt), "--out", str(out), "--force"]) == 2
        assert "is or contains the checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["export", str(ckpt), "--out", str(busy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists and is not empty" in err and "--force" in err
    assert (busy / "notes.txt").read_text() == "mine"
    assert main(["export", str(ckpt), "--out", str(busy), "--force"]) == 0
    assert (busy / "config.json").is_file() and not (busy / "notes.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(ckpt), "--out", str(empty)]) == 0 and (empty / "model.safetensors").is_file()


def test_export_into_the_checkpoint_and_an_absurd_config_are_refused(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """--out inside the checkpoint (which would break its commit record) is refused; a config.json describing
    n_layer 100000 is refused before anything is allocated (it would take gigabytes), by load, generate and export."""
    ckpt = _broken(checkpoint, tmp_path)
    assert main(["export", str(ckpt), "--out", str(ckpt / "sub"), "--force"]) == 2
    assert "is inside the checkpoint" in capsys.readouterr().err and not (ckpt / "sub").exists()
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["n_layer"] = 100000
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="config and weights do not belong together"):
        load_checkpoint(ckpt)
    for argv in (["generate", str(ckpt), "--prompt", "x"], ["export", str(ckpt), "--out", str(tmp_path / "hf")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "config and weights do not belong together" in err
