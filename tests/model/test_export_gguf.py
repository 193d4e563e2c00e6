"""GGUF export (model/export_gguf.py) read back by llama.cpp itself, through its Python binding (llama-cpp-python,
built from its sdist by `make install`): tokenizer, logits, greedy tokens and perplexity against raygpt's own."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.cli import main
from model.checkpoint import load_checkpoint, save_checkpoint
from model.export import ExportError
from model.export_gguf import export_gguf
from model.generate import generate
from tests.conftest import perturbed_model

pytestmark = pytest.mark.kernels  # compares with raygpt's generation: CI reruns it with the ISA forced to AVX2


@contextmanager
def llama(path: Path, n_ctx: int) -> Iterator[object]:
    from llama_cpp import Llama

    model = Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        yield model
    finally:
        model.close()  # not at interpreter exit, where the binding's finaliser fails


def held_out_text(shared_data: Path) -> str:
    """Shakespeare past the 200,000 characters the tests' tokenizer was trained on."""
    return (shared_data / "tinyshakespeare" / "input.txt").read_text()[300_000:302_000]


def bits_per_byte(logits_of, windows: list[list[int]], tokenizer) -> float:  # noqa: ANN001
    """Σ next-token NLL over the windows, in bits per UTF-8 byte of the predicted tokens."""
    nll, nbytes = 0.0, 0
    for ids in windows:
        logits = torch.as_tensor(np.asarray(logits_of(ids)), dtype=torch.float64)[:-1]
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        nbytes += len(tokenizer.decode(ids[1:]).encode())
    return nll / math.log(2) / nbytes


def llama_cpp_logits(model) -> object:  # noqa: ANN001
    def logits_of(ids: list[int]) -> np.ndarray:
        model.reset()
        model.eval(ids)
        return np.array(model.scores[: len(ids)])

    return logits_of


def raygpt_logits(raygpt) -> object:  # noqa: ANN001
    def logits_of(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return raygpt(torch.tensor([ids]))[0][0]

    return logits_of


def windows_of(text: str, loaded, count: int = 4) -> list[list[int]]:  # noqa: ANN001
    ids = loaded.tokenizer.encode(text).ids
    size = loaded.config.block_size
    return [ids[i * size : (i + 1) * size] for i in range(count)]


def test_f16_gguf_matches_raygpt_in_llama_cpp(checkpoint: Path, shared_data: Path, tmp_path: Path) -> None:
    """Both families (the fixture's llama has GQA, its gpt2 biases): llama.cpp tokenizes as we do, its greedy tokens
    are ours up to near-ties, and its perplexity on held-out text is ours within 1%."""
    out = tmp_path / "model-f16.gguf"
    assert main(["export", str(checkpoint), "--format", "gguf", "--out", str(out)]) == 0
    loaded = load_checkpoint(checkpoint)
    text = held_out_text(shared_data)
    with llama(out, loaded.config.block_size) as theirs:
        assert theirs.tokenize(text.encode(), add_bos=False, special=False) == loaded.tokenizer.encode(text).ids
        arch = theirs.metadata["general.architecture"]
        assert arch == ("llama" if loaded.config.pos_encoding == "rope" else "gpt2")
        assert int(theirs.metadata[f"{arch}.context_length"]) == loaded.config.block_size
        assert theirs.n_vocab() == loaded.config.vocab_size
        assert theirs.token_eos() == loaded.tokenizer.token_to_id(loaded.eot_token)
        windows = windows_of(text, loaded)
        ours_bpb = bits_per_byte(raygpt_logits(loaded.model), windows, loaded.tokenizer)
        theirs_bpb = bits_per_byte(llama_cpp_logits(theirs), windows, loaded.tokenizer)
        assert abs(theirs_bpb / ours_bpb - 1) < 0.01, (ours_bpb, theirs_bpb)
        prompt = windows[0][:8]
        ours = generate(loaded.model, torch.tensor([prompt]), 24)[0, 8:].tolist()
        theirs.reset()
        got = [t for t, _ in zip(theirs.generate(prompt, temp=0.0, top_k=1), range(24))]
    if got != ours:  # allowed only where our own top two logits are a near-tie (f16 weights move logits ~1e-3)
        step = next(i for i, (a, b) in enumerate(zip(ours, got)) if a != b)
        logits = raygpt_logits(loaded.model)(prompt + ours[:step])[-1]
        assert (logits[ours[step]] - logits[got[step]]).item() < 5e-3, (ours, got)


def test_quantized_gguf_files_load_and_generate(checkpoint: Path, shared_data: Path, tmp_path: Path) -> None:
    """q8_0 / q4_0 (gguf.quants) and q4_k_m (llama.cpp's quantizer) load in llama.cpp and generate; they are smaller
    than f16 and their perplexity stays near it (q8_0 within 2%)."""
    loaded = load_checkpoint(checkpoint)
    windows = windows_of(held_out_text(shared_data), loaded)
    sizes, bpb = {}, {}
    for quant in ("f16", "q8_0", "q4_0", "q4_k_m"):
        out = export_gguf(checkpoint, tmp_path / f"{quant}.gguf", quant)
        sizes[quant] = out.stat().st_size
        with llama(out, loaded.config.block_size) as theirs:
            bpb[quant] = bits_per_byte(llama_cpp_logits(theirs), windows, loaded.tokenizer)
            theirs.reset()
            assert len([t for t, _ in zip(theirs.generate(windows[0][:8], temp=0.0, top_k=1), range(8))]) == 8
    print(f"{loaded.config.pos_encoding} gguf bits/byte {bpb}, bytes {sizes}")
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"] and sizes["q4_k_m"] < sizes["f16"]
    assert abs(bpb["q8_0"] / bpb["f16"] - 1) < 0.02
    assert all(abs(bpb[q] / bpb["f16"] - 1) < 0.2 for q in ("q4_0", "q4_k_m")), bpb
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_bad_gguf_exports_are_one_line_and_write_nothing(checkpoint: Path, tokenizer_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.gguf"
    assert main(["export", str(checkpoint), "--format", "gguf", "--quant", "q3_x", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "raygpt: error: unknown --quant 'q3_x' (known: f32, f16, q8_0, q4_0, q4_k_m)\n"
    assert main(["export", str(checkpoint), "--quant", "q8_0", "--out", str(tmp_path / "hf")]) == 2
    assert "--quant is for --format gguf" in capsys.readouterr().err
    out.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="exists; pass --force"):
        export_gguf(checkpoint, out, "f16")
    assert out.read_bytes() == b"keep me"
    export_gguf(checkpoint, out, "f16", force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    narrow = save_checkpoint(perturbed_model("llama", n_embd=48, n_head=4), tmp_path / "narrow", tokenizer_file)
    with pytest.raises(ExportError, match=r"q8_0 needs rows whose length is a multiple of 32; .* rows of 48"):
        export_gguf(narrow, tmp_path / "narrow.gguf", "q8_0")
    from model.quantize import quantize_model

    model = load_checkpoint(checkpoint).model
    record = quantize_model(model, "int8")
    quantized = save_checkpoint(model, tmp_path / "int8", tokenizer_file, extra={"quantization": record})
    with pytest.raises(ExportError, match=r"is quantized \(int8\); export the full-precision checkpoint"):
        export_gguf(quantized, tmp_path / "int8.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8", "m.gguf", "narrow"]
