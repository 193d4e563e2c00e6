"""Hugging Face → raygpt (`raygpt import`) and back: a randomly initialised transformers Llama / GPT-2 saved to disk
imports to the same function (logits within 1e-4), export(import(x)) gives x's weights back, and the export stops
`generate` at end-of-text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cluster.cli import main
from model.checkpoint import load_checkpoint, save_checkpoint
from model.export import export, hf_tokenizer
from model.gpt import GPT, ModelConfig


def _hf_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False, rms_norm_eps=1e-5, eos_token_id=0)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # norms and biases away from their init values, so mapping mistakes show
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(params=["llama", "gpt2"])
def hf_folder(request: pytest.FixtureRequest, tmp_path: Path, tokenizer_file: Path) -> Path:
    folder = tmp_path / f"hf-{request.param}"
    _hf_model(request.param).save_pretrained(folder, safe_serialization=True)
    hf_tokenizer(tokenizer_file, "<|endoftext|>").save_pretrained(folder)
    return folder


def test_import_computes_the_same_function_and_round_trips(hf_folder: Path, tmp_path: Path) -> None:
    assert main(["import", str(hf_folder), "--out", str(tmp_path / "ckpt")]) == 0
    loaded = load_checkpoint(tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert (loaded.model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
    assert loaded.eot_token == "<|endoftext|>" and loaded.step == 0
    again = export(tmp_path / "ckpt", tmp_path / "again")
    before, after = load_file(str(hf_folder / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    keys = ("vocab_size", "num_hidden_layers", "num_key_value_heads", "intermediate_size", "n_layer", "n_inner")
    original, exported = json.loads((hf_folder / "config.json").read_text()), json.loads((again / "config.json").read_text())
    if original["model_type"] == "gpt2":
        original["n_inner"] = original["n_inner"] or 4 * original["n_embd"]  # None means 4 × n_embd
    assert {k: original.get(k) for k in keys} == {k: exported.get(k) for k in keys}


def test_unsupported_or_unsafe_folders_are_one_line(hf_folder: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    original = (hf_folder / "config.json").read_text()
    config = json.loads(original)
    if config["model_type"] == "llama":
        config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
        expected = "rope scaling 'llama3' is not supported"
    else:
        config["activation_function"] = "relu"
        expected = "activation_function 'relu' is not supported"
    (hf_folder / "config.json").write_text(json.dumps(config))
    assert main(["import", str(hf_folder), "--out", str(tmp_path / "a")]) == 2
    assert expected in capsys.readouterr().err
    (hf_folder / "config.json").write_text(original)
    (hf_folder / "model.safetensors").rename(hf_folder / "pytorch_model.bin")
    assert main(["import", str(hf_folder), "--out", str(tmp_path / "b")]) == 2
    assert "only pickled weights (*.bin / *.pt), which raygpt never loads" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_export_stops_generate_at_end_of_text(arch: str, tmp_path: Path, tokenizer_file: Path) -> None:
    overrides = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False) if arch == "llama" else {}
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False,
                            **overrides))
    eot = 0  # <|endoftext|>, the tokenizer's first special token
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy decoding picks the first id, end-of-text, every time
    out = export(save_checkpoint(model, tmp_path / "ckpt", tokenizer_file), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == eot
    assert generation["pad_token_id"] == eot and generation["eos_token_id"] == [eot, 2]  # 2: <|im_end|>, a turn's end
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert generated[0, 4:].tolist() == [eot]  # stopped right after end-of-text, not after 20 tokens


def _import_error(src: Path, out: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """`raygpt import` refused in one line; the error line."""
    assert main(["import", str(src), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raygpt: error: "), err
    return err


def test_broken_folders_are_one_line_and_nothing_is_written(hf_folder: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The audit's import probes: a config.json that is not JSON, lacks a key, has heads that do not divide, or
    describes far more parameters than the weights hold; a truncated tokenizer or weights file; a pickle named
    model.safetensors (never run); an index whose weight_map leaves the folder."""
    config = json.loads((hf_folder / "config.json").read_text())
    layers = "num_hidden_layers" if config["model_type"] == "llama" else "n_layer"
    heads = "num_attention_heads" if config["model_type"] == "llama" else "n_head"
    out = tmp_path / "out"

    def broken(name: str, change: object) -> Path:
        folder = tmp_path / name
        shutil.copytree(hf_folder, folder)
        change(folder) if callable(change) else (folder / "config.json").write_text(json.dumps(change))
        return folder

    assert "not valid JSON" in _import_error(broken("notjson", lambda f: (f / "config.json").write_text("{oops")), out, capsys)
    assert f"no '{layers}'" in _import_error(broken("nokey", {k: v for k, v in config.items() if k != layers}), out, capsys)
    assert "is not divisible by n_head" in _import_error(broken("heads", {**config, heads: 7}), out, capsys)
    assert "config and weights do not belong together" in _import_error(broken("huge", {**config, layers: 100000}), out, capsys)
    half = lambda name: lambda f: (f / name).write_bytes((f / name).read_bytes()[: (f / name).stat().st_size // 2])  # noqa: E731
    assert "tokenizer.json: not a valid tokenizers file" in _import_error(broken("tok", half("tokenizer.json")), out, capsys)
    assert "not a readable safetensors file" in _import_error(broken("weights", half("model.safetensors")), out, capsys)
    pickled = broken("pickle", lambda f: torch.save({"x": torch.zeros(1 << 18)}, f / "model.safetensors"))
    assert "not a readable safetensors file" in _import_error(pickled, out, capsys)

    def outside(folder: Path) -> None:
        (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
        names = load_file(str(tmp_path / "outside.safetensors"))
        index = {"weight_map": {name: "../outside.safetensors" for name in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    assert "points outside" in _import_error(broken("index", outside), out, capsys)
    assert not out.exists()


def test_out_never_destroys_the_source(hf_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--out equal to the source, its parent or a folder inside it is refused even with --force; --out a file too."""
    before = {p.name: p.read_bytes() for p in hf_folder.iterdir()}
    for out in (hf_folder, hf_folder.parent):
        assert "is or contains the source folder" in _import_error(hf_folder, out, capsys, "--force")
    assert "is inside the source folder" in _import_error(hf_folder, hf_folder / "sub", capsys, "--force")
    (tmp_path / "afile").write_text("mine")
    assert "is a file, not a folder" in _import_error(hf_folder, tmp_path / "afile", capsys, "--force")
    assert {p.name: p.read_bytes() for p in hf_folder.iterdir()} == before
    assert (tmp_path / "afile").read_text() == "mine"
