"""`raygpt quantize` end to end on local Ray: methods as tasks, quantized checkpoints evaluated like `raygpt eval`,
report.json per method and overall, the stage's own report.md (eval's report.md untouched), skip when complete,
one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance

from cluster.cli import main
from evaluation.lm import RaygptLM
from model.checkpoint import save_checkpoint
from tests.conftest import SHAKESPEARE, perturbed_model

QUICK = ["quantize.calibration_samples=16", "quantize.group_size=32", "quantize.decode_tokens=16",
         "quantize.eval_tasks=false", "eval.max_tokens=2000", "eval.batch_size=8"]


def _run_dir(trained_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoint", run_dir / "checkpoint")
    shutil.copytree(trained_run / "data", run_dir / "data")
    return run_dir


def test_quantize_end_to_end(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir(trained_run, tmp_path)
    args = ["quantize", SHAKESPEARE, f"run_dir={run_dir}", "quantize.methods=[int8,gptq,bnb-nf4]",
            "quantize.gguf=[q8_0,q4_k_m]", *QUICK]
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "report.md").write_text("# Evaluation\n\n## Quantization\n\nwritten by raygpt eval\n")
    assert main(args) == 0
    report = json.loads((run_dir / "quantized" / "report.json").read_text())
    full, methods = report["full_precision"], {r["method"]: r for r in report["methods"]}
    assert set(methods) == {"int8", "gptq", "bnb-nf4"} and full["size_vs_fp32"] == 1.0
    for name, row in methods.items():
        assert row == json.loads((run_dir / "quantized" / name / "report.json").read_text())
        assert row["size_vs_fp32"] < 0.35 and row["size_vs_bf16"] == pytest.approx(2 * row["size_vs_fp32"])
        assert abs(row["delta_bpb_pct"]) < 10 and row["decode_tokens_per_s"] > 0
        assert row["eval"]["intrinsic"]["val"]["tokens"] == 2000 and row["eval"]["step"] == 60
    assert full["kl_vs_fp32"] == 0 and full["top1_agreement"] == 1
    for row in methods.values():  # a quantized model's distributions differ from full precision's, but little
        assert 0 < row["kl_vs_fp32"] < 0.5 and 0.5 < row["top1_agreement"] <= 1
    assert methods["gptq"]["calibration_samples"] == 16 and methods["gptq"]["group_size"] == 32
    assert methods["gptq"]["calibration_s"] > 0 and methods["int8"]["bits"] == 8
    assert {row["calibration_device"] for row in methods.values()} == {"cpu"}  # quantize.num_gpus 0
    assert {(row["decode_device"], row["decode_precision"]) for row in methods.values()} == {("cpu", "fp32")}
    kernels = {name: row["kernel"] for name, row in methods.items()}
    assert kernels == {"int8": "int8pack-cpu", "gptq": "int4pack-cpu, int8pack-cpu", "bnb-nf4": "bitsandbytes, int8pack-cpu"}
    assert full["kernel"] == "dense" and all(row["resident_bytes"] >= 0 for row in [full, *methods.values()])
    gguf = {r["method"]: r for r in report["gguf"]}  # exported and measured in llama.cpp
    assert set(gguf) == {"gguf-q8_0", "gguf-q4_k_m"}
    for quant, row in gguf.items():
        assert row["file"] == str(run_dir / "quantized" / "gguf" / f"model-{quant[5:]}.gguf")
        assert Path(row["file"]).stat().st_size == row["size_bytes"] and row["size_vs_fp32"] < 0.5
        assert 0 < row["kl_vs_fp32"] < 0.5 and row["decode_tokens_per_s"] > 0 and row["kernel"] == "llama.cpp"
    assert abs(gguf["gguf-q8_0"]["delta_bpb_pct"]) < 1 and abs(gguf["gguf-q4_k_m"]["delta_bpb_pct"]) < 10
    assert methods["bnb-nf4"]["transformers"] == str(run_dir / "quantized" / "bnb-nf4" / "hf")
    assert methods["gptq"]["transformers"] == str(run_dir / "quantized" / "gptq" / "hf")  # compressed-tensors
    markdown = (run_dir / "quantized" / "report.md").read_text()
    assert markdown.startswith("# Quantization\n") and "| gptq | 4 | 32 |" in markdown and "Every metric" in markdown
    assert "GPTQ/AWQ calibrated on cpu; decoding timed on cpu in fp32." in markdown
    assert "| gguf-q8_0 | 8.5 | 32 |" in markdown and "† GGUF rows: llama.cpp's bits per byte" in markdown
    assert (run_dir / "eval" / "report.md").read_text().endswith("written by raygpt eval\n")  # eval's file is eval's
    out = capsys.readouterr().out
    assert "| gptq | 4 | 32 |" in out and "[quantize] methods 4/4 (100%) " in out  # one progress line per method
    lm = RaygptLM(str(run_dir / "quantized" / "gptq"))  # what `raygpt eval` and `lm_eval --model raygpt` load
    [logprob] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("ROMEO: What say you?",), 0)])
    assert -200 < logprob < 0

    assert main(args) == 0  # complete: skipped
    assert "skipping" in capsys.readouterr().out


def test_quantize_errors(trained_run: Path, tmp_path: Path, tokenizer_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run_dir(trained_run, tmp_path)
    other = save_checkpoint(perturbed_model("llama"), tmp_path / "vocab300", tokenizer_file)
    cases = [
        ([f"quantize.checkpoint={other}"], "has vocab_size 300 but the data"),
        (["quantize.methods=[int3]"], "quantize.methods[0]: Input should be"),
        (["quantize.gguf=[q5_x]"], "quantize.gguf[0]: Input should be"),
        ([f"quantize.checkpoint={tmp_path}/none"], "quantize.checkpoint: "),
    ]
    for overrides, message in cases:
        assert main(["quantize", SHAKESPEARE, f"run_dir={run_dir}", *QUICK, *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("raygpt: error: ") and message in err and "\n" not in err, err
    shutil.rmtree(run_dir / "data")
    assert main(["quantize", SHAKESPEARE, f"run_dir={run_dir}", *QUICK, "quantize.methods=[gptq]"]) == 2
    assert "gptq/awq need calibration data" in capsys.readouterr().err
    assert not (run_dir / "quantized" / "report.json").exists()
