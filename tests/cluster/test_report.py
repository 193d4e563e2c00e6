"""The report card (`raygpt report RUN_DIR`, also the end of `raygpt run`): report.md with the training summary, the
eval table and the quantization table, and real PNG plots; stages that did not run are said so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from cluster.cli import main


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_report_card_of_a_trained_run(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("eval", "quantized", "report*"))
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"report card: {run_dir / 'report.md'}"
    report = (run_dir / "report.md").read_text()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if "val_loss" in m][-1]
    assert f"{metrics[-1]['step']} steps, {metrics[-1]['tokens'] / 1e6:.2f}M tokens" in report  # as the trainer counted
    assert f"validation loss {val['val_loss']:.3f}" in report
    assert "![loss](report/loss.png)" in report and report.count("Not run yet.") == 2  # eval, quantization
    for plot in ("loss.png", "throughput.png"):
        width, height = _png_size(run_dir / "report" / plot)
        assert width > 600 and height > 250

    quantized = run_dir / "quantized"
    quantized.mkdir()
    row = {"method": "fp32", "size_bytes": 22_000_000, "size_vs_fp32": 1.0, "val_bpb": 2.4440, "delta_bpb_pct": None,
           "kl_vs_fp32": 0.0, "top1_agreement": 1.0, "decode_vs_fp32": 1.0}
    int8 = dict(row, method="int8", size_bytes=5_600_000, size_vs_fp32=0.254, val_bpb=2.4444, delta_bpb_pct=0.017,
                kl_vs_fp32=0.0006, top1_agreement=0.954, decode_vs_fp32=1.10)
    (quantized / "report.json").write_text(json.dumps({"full_precision": row, "methods": [int8]}))
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert "| int8 | 5.6 | 0.254 | - | 2.4444 | +0.02% | 0.00060 | 95.4% | 1.10 | - |" in report
    assert report.count("Not run yet.") == 1 and _png_size(run_dir / "report" / "quantization.png")[0] > 500


def test_report_of_something_else_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"raygpt: error: {tmp_path}: not a run directory (no config.yaml or "
                                               "metrics.jsonl)")
    assert not (tmp_path / "report.md").exists()
