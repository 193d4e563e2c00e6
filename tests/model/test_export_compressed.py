"""int8 / int4-rtn / GPTQ / AWQ checkpoints exported as compressed-tensors and loaded by transformers on the CPU
(both of its routes, with compressed-tensors' own decompression): the exact weights and logits of raygpt's quantized
model; AWQ's scale folding keeps a model's function; refusals are one line with nothing written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.checkpoint import load_checkpoint, save_checkpoint
from model.export import ExportError, export
from model.export_compressed import COMPRESSED_METHODS
from model.quantize import block_linears, quantize_model
from model.quantize_calibrate import awq_fold
from model.quantize_kernels import QuantLinear
from tests.conftest import perturbed_model

pytestmark = pytest.mark.kernels  # compares with raygpt's quantized kernels; CI runs these again forced to AVX2


@pytest.mark.parametrize("arch, kv_heads", [("llama", 2), ("llama", 4), ("gpt2", 4)])
def test_awq_folding_keeps_the_blocks_function(arch: str, kv_heads: int) -> None:
    """Scales folded into norm1/norm2 (and v rows without GQA, up rows with SwiGLU) leave each block's output as it
    was, up to fp32 rounding, while the weights really change."""
    model = perturbed_model(arch, n_kv_head=kv_heads)
    block = model.blocks[0]
    before = copy.deepcopy(block)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 64, generator=gen)
    _, rope = model.embed(torch.zeros(4, 16, dtype=torch.long))  # the model's own position tables
    with torch.no_grad():
        expected = block(x, rope, None, 0)
    inputs = {}  # calibration rows with a few salient channels, so that every searched scale differs from 1
    for name, parent, attr in block_linears(model):
        if name.startswith("blocks.0."):
            rows = torch.randn(256, getattr(parent, attr).in_features, generator=gen)
            inputs[name.removeprefix("blocks.0.")] = rows * (1 + 7 * (torch.arange(rows.shape[1]) < 3))
    awq_fold(block, model.cfg, inputs, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x, rope, None, 0), expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(block.norm1.weight, before.norm1.weight)
    assert not torch.equal(block.norm2.weight, before.norm2.weight)
    v = slice((4 + kv_heads) * 16, None)  # heads of 16: q rows, k rows, then v rows
    qkv_after, qkv_before = block.attn.qkv.weight * block.norm1.weight, before.attn.qkv.weight * before.norm1.weight
    v_folded = not torch.allclose(qkv_after[v], qkv_before[v], rtol=1e-4, atol=1e-6)  # norm1's scale cancels in both
    assert v_folded == (kv_heads == 4)  # several heads read one v row under GQA: v → proj is not scaled
    up_after, up_before = block.mlp.up.weight * block.norm2.weight, before.mlp.up.weight * before.norm2.weight
    up_folded = not torch.allclose(up_after, up_before, rtol=1e-4, atol=1e-6)
    assert up_folded == (arch == "llama")  # gelu(up) is not linear in up: up → down is scaled with SwiGLU only


def _quantized_checkpoint(method: str, tmp_path: Path, tokenizer_file: Path, arch: str = "llama") -> Path:
    model = perturbed_model(arch)
    calibration = torch.randint(0, 300, (16, 64), generator=torch.Generator().manual_seed(1))
    record = quantize_model(model, method, group_size=32, calibration=calibration)
    return save_checkpoint(model, tmp_path / method, tokenizer_file, extra={"quantization": record})


@pytest.mark.parametrize("method", COMPRESSED_METHODS)
def test_compressed_tensors_export_loads_in_transformers_with_raygpts_weights_and_logits(
    method: str, tokenizer_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    folder = _quantized_checkpoint(method, tmp_path, tokenizer_file)
    hf_dir = export(folder, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)  # compressed-tensors' own config model
    weights = parsed.config_groups["group_0"].weights
    assert config["quant_method"] == "compressed-tensors" and parsed.format == "pack-quantized"
    assert parsed.ignore == ["lm_head"] and weights.num_bits == (8 if method == "int8" else 4)
    assert weights.symmetric == (method == "int8") and weights.group_size == (None if method == "int8" else 32)
    bits, groups = (8, 1) if method == "int8" else (4, 2)  # in_features 64 (the MLP's down: 256), groups of 32
    with safe_open(hf_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        layers = [key.removesuffix(".weight_packed") for key in keys if key.endswith(".weight_packed")]
        assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per block
        for layer in layers:  # the shapes and dtypes of the parameters vLLM's WNA16 scheme loads them into
            out, width = f.get_tensor(f"{layer}.weight_shape").tolist()
            assert f.get_tensor(f"{layer}.weight_shape").dtype == torch.int64
            assert f.get_slice(f"{layer}.weight_packed").get_shape() == [out, width * bits // 32]
            g = groups * width // 64 if method != "int8" else 1
            assert f.get_slice(f"{layer}.weight_scale").get_shape() == [out, g]
            if method != "int8":
                assert f.get_tensor(f"{layer}.weight_zero_point").dtype == torch.int32
                assert f.get_slice(f"{layer}.weight_zero_point").get_shape() == [-(-out * bits // 32), g]
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed")
    assert packed.dtype == torch.int32 and packed.shape == (64, 64 * bits // 32)
    assert "model.layers.0.mlp.down_proj.weight" not in keys and "model.layers.0.mlp.down_proj.weight_scale" in keys
    assert ("model.layers.1.self_attn.v_proj.weight_zero_point" in keys) == (method != "int8")

    ours = load_checkpoint(folder).model
    w_q, w_k, w_v = ours.blocks[0].attn.qkv.dequantized().split([64, 32, 32])
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        close = ours(ids)[0]  # our kernels round activations to bf16 for the call
        for route in ({}, {"quantization_config": CompressedTensorsConfig(dequantize=True)}):
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, device_map="cpu", **route).eval()
            theirs = hf(ids).logits  # the default route decompresses on the first forward
            attn = hf.model.layers[0].self_attn
            for mine, their in ((w_q, attn.q_proj), (w_k, attn.k_proj), (w_v, attn.v_proj)):
                # compressed-tensors' dequantization is ours bit for bit: (q - zero) · scale, the same elementwise
                # IEEE operations on both sides (no reduction, so no kernel or ISA can order them differently)
                assert torch.equal(their.weight, mine)
            assert ((theirs - close).norm() / close.norm()).item() < 0.03
        monkeypatch.setattr(QuantLinear, "_choose_kernel", lambda self, x: "dequantize")  # fp32 weight-only matmul
        same = load_checkpoint(folder).model(ids)[0]  # a fresh model: layers choose their kernel on the first call
    torch.testing.assert_close(theirs, same, rtol=1e-5, atol=1e-5)  # same weights, fp32 on both sides
    assert hf.generate(ids[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)


def test_compressed_export_refusals_are_one_line_and_write_nothing(tokenizer_file: Path, tmp_path: Path) -> None:
    gpt2 = _quantized_checkpoint("int4-rtn", tmp_path / "gpt2", tokenizer_file, arch="gpt2")
    with pytest.raises(ExportError, match="Conv1D") as error:
        export(gpt2, tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()

    model = perturbed_model("llama")  # an AWQ checkpoint from before the scales were folded: one input_scale kept
    record = quantize_model(model, "int4-rtn", group_size=32)
    linear = torch.nn.Linear(64, 64, bias=False)
    model.blocks[0].attn.proj = QuantLinear.from_linear(linear, 4, 32, input_scale=torch.rand(64) + 0.5)
    record |= {"method": "awq"}
    record["modules"]["blocks.0.attn.proj"]["input_scale"] = True
    old = save_checkpoint(model, tmp_path / "old-awq", tokenizer_file, extra={"quantization": record})
    with pytest.raises(ExportError, match="quantize the checkpoint again") as error:
        export(old, tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_layers_with_different_group_sizes_are_named_per_scheme(tokenizer_file: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Group 128 fits the 256-wide down projection but not the 64-wide others (whole rows there): two schemes, each
    naming its layers, and transformers still computes raygpt's function."""
    from transformers import AutoModelForCausalLM

    model = perturbed_model("llama")
    record = quantize_model(model, "int4-rtn", group_size=128)
    folder = save_checkpoint(model, tmp_path / "ckpt", tokenizer_file, extra={"quantization": record})
    hf_dir = export(folder, tmp_path / "hf")
    groups = json.loads((hf_dir / "config.json").read_text())["quantization_config"]["config_groups"]
    sizes = {g["weights"]["group_size"]: g["targets"] for g in groups.values()}
    assert set(sizes) == {64, 128} and sizes[128] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(QuantLinear, "_choose_kernel", lambda self, x: "dequantize")
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(hf_dir, device_map="cpu").eval()(ids).logits
        torch.testing.assert_close(theirs, load_checkpoint(folder).model(ids)[0], rtol=1e-5, atol=1e-5)
