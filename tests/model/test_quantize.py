"""Quantization methods on a trained debug model: outputs close to full precision (per-method bounds), save/load
round trip through load_checkpoint, bitsandbytes checkpoints exported to and loaded by transformers, GPTQ and AWQ beat
RTN on a fixed layer, packing, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evaluation.quantize import first_blocks
from model import quantize_kernels as quantize_module
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.export import export
from model.generate import generate
from model.gpt import GPT, ModelConfig
from model.quantize import METHODS, QuantizeError, quantize_model
from model.quantize_calibrate import gptq
from model.quantize_kernels import QuantLinear, pack4, rtn_int4, unpack4

pytestmark = pytest.mark.kernels  # CI runs these again with the CPU ISA forced to AVX2

# relative L2 error of the logits on val blocks, measured ~3x below these on the 60-step debug model
BOUNDS = {"int8": 0.02, "int4-rtn": 0.15, "gptq": 0.15, "awq": 0.15, "bnb-int8": 0.05, "bnb-nf4": 0.15}


@pytest.fixture(scope="module")
def val_batch(trained_run: Path) -> torch.Tensor:
    from data_pipeline.manifest import read_manifest

    blocks = [torch.from_numpy(b[:-1].astype("int64")) for _, b in zip(range(8), read_manifest(trained_run / "data").blocks(trained_run / "data", "val"))]
    return torch.stack(blocks)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_stays_close_and_round_trips(method: str, trained_run: Path, val_batch: torch.Tensor, tmp_path: Path) -> None:
    loaded = load_checkpoint(trained_run / "checkpoint")
    model, cfg, tokenizer = loaded.model, loaded.config, loaded.tokenizer_file
    with torch.no_grad():
        reference = model(val_batch)[0]
        calibration = first_blocks(trained_run / "data", "train", 32)
        record = quantize_model(model, method, group_size=32, calibration=calibration)
        quantized = model(val_batch)[0]
    error = ((quantized - reference).norm() / reference.norm()).item()
    assert 0 < error < BOUNDS[method], error
    folder = save_checkpoint(model, tmp_path / method, tokenizer, extra={"quantization": record})
    fp32_bytes = (trained_run / "checkpoint" / "model.safetensors").stat().st_size
    assert (folder / "model.safetensors").stat().st_size < (0.35 if METHODS[method] == 8 else 0.3) * fp32_bytes
    reloaded = load_checkpoint(folder)
    loaded, loaded_cfg = reloaded.model, reloaded.config
    with torch.no_grad():
        restored = loaded(val_batch)[0]
    if method == "bnb-nf4":  # same packed weights and stats, but bitsandbytes' NF4 CPU matmul differs slightly
        assert ((restored - quantized).norm() / quantized.norm()).item() < 1e-2
    else:
        assert torch.equal(restored, quantized)  # bit-identical after the round trip
    assert loaded_cfg == cfg and json.loads((folder / "config.json").read_text())["quantization"]["method"] == method
    out = generate(loaded, val_batch[:1, :8], max_new_tokens=8)  # KV-cache decoding runs on quantized layers
    assert out.shape == (1, 16)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_checkpoint_loads_in_transformers(
    arch: str, method: str, tokenizer_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from tests.conftest import perturbed_model

    model = perturbed_model(arch)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    record = quantize_model(model, method)
    folder = save_checkpoint(model, tmp_path / method, tokenizer_file, extra={"quantization": record})
    hf_dir = export(folder, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, device_map="cpu").eval()
    config = json.loads((hf_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit" if method == "bnb-nf4" else "load_in_8bit"]
    kinds = {type(m) for m in hf.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    assert kinds == {bnb.nn.Linear4bit if method == "bnb-nf4" else bnb.nn.Linear8bitLt}
    ours = load_checkpoint(folder).model
    with torch.no_grad():
        theirs = hf(ids).logits
        close = ours(ids)[0]  # our int8 head's CPU kernel rounds its input to bf16, transformers' fp32 head does not
        monkeypatch.setattr(QuantLinear, "_choose_kernel", lambda self, x: "dequantize")  # fp32 weight-only matmul
        same = load_checkpoint(folder).model(ids)[0]  # a fresh model: layers choose their kernel on the first call
    # The same codes and the same weight-only function, but not always the same kernel: bitsandbytes' CPU NF4 matmul
    # and ours dequantize identically and then accumulate in an order that depends on the ISA (equal bit for bit on
    # AVX-512, 7e-7 apart on AVX2). fp32 accumulation over n_embd=64 terms of logits ~1 stays within 1e-5.
    torch.testing.assert_close(theirs, same, rtol=1e-5, atol=1e-5)
    assert ((theirs - close).norm() / close.norm()).item() < 0.03
    assert hf.generate(ids[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)


def _layer_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed layer and correlated calibration inputs with a few large channels (as in trained transformers)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=gen) * 0.05
    x = torch.randn(2048, 128, generator=gen) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=gen))
    x[:, :4] *= 8
    return w, x


def _output_error(w: torch.Tensor, x: torch.Tensor, deq: torch.Tensor) -> float:
    return ((x @ deq.T - x @ w.T).pow(2).mean()).item()


def test_gptq_and_awq_reconstruct_better_than_rtn() -> None:
    w, x = _layer_problem()
    linear = torch.nn.Linear(128, 96, bias=False)
    linear.weight.data = w
    H = 2 * x.T @ x / len(x)
    rtn = _output_error(w, x, QuantLinear.from_linear(linear, 4, 32).dequantized())
    for act_order in (False, True):
        q = QuantLinear.from_linear(linear, 4, 32, codes=gptq(w, H, 32, act_order=act_order))
        assert _output_error(w, x, q.dequantized()) < 0.7 * rtn
    from model.quantize_calibrate import awq_clip, awq_scale

    scale = awq_scale(w, x, 32)
    scaled_only = _output_error(w, x, QuantLinear.from_linear(linear, 4, 32, input_scale=scale).dequantized())
    assert scaled_only < rtn
    clipped = rtn_int4(awq_clip(w * scale, x / scale, 32), 32)
    awq = QuantLinear.from_linear(linear, 4, 32, codes=clipped, input_scale=scale)
    assert _output_error(w, x, awq.dequantized()) < scaled_only  # the clipping search helps further


def test_int4_packing_and_rtn_grid() -> None:
    w = torch.randn(8, 64)
    codes, scale, zero = rtn_int4(w, 16)
    assert codes.min() >= 0 and codes.max() <= 15 and scale.shape == zero.shape == (8, 4)
    assert torch.equal(unpack4(pack4(codes)), codes.to(torch.uint8))
    deq = ((codes.view(8, 4, 16) - zero[..., None]) * scale[..., None]).flatten(1)
    assert (deq - w).abs().max() <= scale.max() / 2 + 1e-6  # round to nearest: within half a step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("input_scale", [False, True])
def test_cpu_kernels_match_the_dequantized_matmul_and_keep_no_dense_weight(input_scale: bool, dtype: torch.dtype) -> None:
    """On a CPU, whatever its ISA, int8 runs PyTorch's `_weight_int8pack_mm` and 4-bit `_weight_int4pack_mm_for_cpu`
    (bf16 activations for the call), computing our weight; layers the int4 kernel does not take (group 16,
    out_features not a multiple of 16) dequantize per call. No layer keeps a float copy of its weight."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 128, generator=gen).to(dtype)
    cases = ((8, 96, 0, "int8pack-cpu"), (8, 50, 0, "int8pack-cpu"), (4, 96, 32, "int4pack-cpu"),
             (4, 96, 16, "dequantize"), (4, 40, 32, "dequantize"))
    for bits, out_features, group_size, kernel in cases:
        linear = torch.nn.Linear(128, out_features)
        scale = torch.rand(128, generator=gen) + 0.5 if input_scale else None
        q = QuantLinear.from_linear(linear, bits, group_size, input_scale=scale)
        with torch.no_grad():
            y = q(x)
            exact = torch.nn.functional.linear(x.float(), q.dequantized(), q.bias)
        assert q.kernel == kernel and y.dtype == dtype and y.shape == (3, 7, out_features)
        kept = [t for t in (q._packed if isinstance(q._packed, tuple) else (q._packed,)) if t is not None]
        assert all(t.numel() < q.qweight.numel() or not t.is_floating_point() for t in kept), kept
        error = ((y.float() - exact).norm() / exact.norm()).item()
        # bf16 activations in the kernels: ~3e-3; the fp32 dequantized path computes the same weight exactly
        assert error < 1e-2 if kernel != "dequantize" or dtype == torch.bfloat16 else error < 1e-6, (kernel, error)


def test_int8_codes_off_the_allocators_alignment_are_realigned_before_the_kernel() -> None:
    """PyTorch's int8 CPU kernel reads its codes with aligned vector loads and crashes on codes 8 bytes off (as a
    tensor that views a file's memory can be): the layer copies such codes once, to aligned memory."""
    q = QuantLinear.from_linear(torch.nn.Linear(64, 128), 8, 0)
    buffer = torch.empty(q.qweight.numel() + 64, dtype=torch.int8)
    q.qweight = buffer[8 : 8 + q.qweight.numel()].view_as(q.qweight).copy_(q.qweight)
    assert q.qweight.data_ptr() % 16 == 8
    x = torch.randn(64, 64)
    with torch.no_grad():
        y = q(x)
    assert q.qweight.data_ptr() % 64 == 0
    torch.testing.assert_close(y, torch.nn.functional.linear(x, q.dequantized(), q.bias), rtol=0.02, atol=0.02)


def test_a_failing_int4_kernel_falls_back_to_the_dequantized_weight_with_one_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA int4 kernel is checked when a layer first packs; here it is forced on CPU tensors, where
    `_convert_weight_to_int4pack` has no kernel and raises: the layer warns once and computes the exact weight."""
    monkeypatch.setattr(QuantLinear, "_choose_kernel", lambda self, x: "int4pack-cuda")
    monkeypatch.setattr(quantize_module, "_WARNED", set())
    layers = [QuantLinear.from_linear(torch.nn.Linear(128, 64), 4, 32) for _ in range(2)]
    x = torch.randn(2, 5, 128)
    with pytest.warns(RuntimeWarning, match="_weight_int4pack_mm not used") as caught:
        for q in layers:
            with torch.no_grad():
                y = q(x)
            assert q.kernel == "dequantize"
            assert torch.allclose(y, torch.nn.functional.linear(x, q.dequantized(), q.bias), atol=1e-5)
    assert len(caught) == 1


def test_the_cuda_int4_path_type_checks_against_torchs_own_shape_rules() -> None:
    """No GPU here, but PyTorch's meta kernels of `_convert_weight_to_int4pack` / `_weight_int4pack_mm` (the CUDA
    ops) run under FakeTensorMode: our packing gives the (n/8, k/128, 32, 4) int32 layout and (G, n, 2) bf16 grids the
    kernel takes, and the matmul gives (rows, out) bf16. The numbers themselves are checked on a GPU when a layer
    first packs (see the fallback test above)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = QuantLinear.from_linear(torch.nn.Linear(256, 96), 4, 64)
    with FakeTensorMode() as mode:
        for name in ("qweight", "scales", "zeros"):
            setattr(q, name, mode.from_tensor(getattr(q, name)))
        q.kernel = "int4pack-cuda"
        weight, grids = q._int4pack(cuda=True)
        y = q._int4_mm(torch.empty(5, 256, dtype=torch.bfloat16), (weight, grids))
    assert (weight.shape, weight.dtype) == ((96 // 8, 256 // 128, 32, 4), torch.int32)
    assert (grids.shape, grids.dtype) == ((256 // 64, 96, 2), torch.bfloat16)
    assert (y.shape, y.dtype) == ((5, 96), torch.bfloat16)


@pytest.mark.parametrize("method", ["int8", "int4-rtn", "awq"])
def test_quantized_checkpoint_runs_its_activations_in_bf16(method: str, trained_run: Path, val_batch: torch.Tensor,
                                                           tmp_path: Path) -> None:
    """`load_for_inference` with bf16 (what a GPU gets by default) keeps codes and scales as saved, casts norms and
    biases, and each layer picks its kernel for bf16 activations; the logits stay close to the fp32 ones."""
    from model.checkpoint import load_for_inference

    loaded = load_checkpoint(trained_run / "checkpoint")
    calibration = first_blocks(trained_run / "data", "train", 8)
    record = quantize_model(loaded.model, method, group_size=32, calibration=calibration)
    folder = save_checkpoint(loaded.model, tmp_path / method, loaded.tokenizer_file, extra={"quantization": record})
    fp32, _ = load_for_inference(folder, use_gpu=False)
    bf16, choice = load_for_inference(folder, use_gpu=False, precision="bf16")
    assert choice.precision == "bf16"
    scales = {k: v.dtype for k, v in fp32.model.state_dict().items() if k.endswith("scales")}
    assert scales and {k: v.dtype for k, v in bf16.model.state_dict().items() if k.endswith("scales")} == scales
    assert bf16.model.blocks[0].norm1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        want, got = fp32.model(val_batch[:2])[0], bf16.model(val_batch[:2])[0]
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()).item() < 0.05
    kernels = {m.kernel for m in bf16.model.modules() if isinstance(m, QuantLinear)}
    assert kernels <= {"dequantize", "int4pack-cpu", "int8pack-cpu"} and kernels
    assert generate(bf16.model, val_batch[:1, :8], max_new_tokens=4).shape == (1, 12)


def test_bad_quantize_input(trained_run: Path, tmp_path: Path) -> None:
    loaded = load_checkpoint(trained_run / "checkpoint")
    model, tokenizer = loaded.model, loaded.tokenizer_file
    with pytest.raises(QuantizeError, match="unknown quantization method 'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(QuantizeError, match="gptq needs calibration sequences"):
        quantize_model(model, "gptq", calibration=None)
    record = quantize_model(model, "int8")
    folder = save_checkpoint(model, tmp_path / "q", tokenizer, extra={"quantization": record})
    config = json.loads((folder / "config.json").read_text())
    config["quantization"] |= {"method": "int4-rtn", "bits": 4}  # the weights no longer match the record
    config["quantization"]["modules"] = {k: {"group_size": 32, "input_scale": False} for k in config["quantization"]["modules"]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(folder)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal", "rope"])
def test_calibration_enters_the_blocks_exactly_as_the_forward_pass_does(pos_encoding: str) -> None:
    """GPTQ/AWQ calibration reaches the first block through `GPT.embed`, the forward pass's own code: for every
    position encoding the first block sees the same input (and rope tables) in both."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, pos_encoding=pos_encoding))
    model.eval()
    ids = torch.randint(0, 64, (4, 16))
    seen: list[tuple[torch.Tensor, object]] = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append((args[0].clone(), args[1])))
    with torch.no_grad():
        model(ids)
    quantize_model(model, "gptq", group_size=16, calibration=ids)
    hook.remove()
    (forward_x, forward_rope), (calib_x, calib_rope) = seen[0], seen[1]
    assert torch.equal(forward_x, calib_x)
    assert (forward_rope is None) == (calib_rope is None) == (pos_encoding != "rope")
    if forward_rope is not None:
        assert all(torch.equal(a, b) for a, b in zip(forward_rope, calib_rope))
