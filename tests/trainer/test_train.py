"""`raygpt train` on local Ray: 2 DeepSpeed workers (gloo on CPU), the debug model, tinyshakespeare shards.
ZeRO 1/2/3 train in bf16 / fp32 / auto, fp32 resume and worker-failure recovery are bit-identical to an uninterrupted run,
gradient accumulation equals a larger batch, and bad setups fail before any worker starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster import pipeline
from cluster.cli import main
from cluster.config import load_config
from model.checkpoint import load_checkpoint
from model.precision import detect
from tests.conftest import BASE, SHAKESPEARE


def _run_dir(prepared: Path, tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(prepared, run_dir / "data")
    return run_dir


def _train(run_dir: Path, *overrides: str, fail_at_step: int | None = None) -> None:
    cfg = load_config(SHAKESPEARE, [f"run_dir={run_dir}", *BASE, *overrides])
    pipeline.run_train(cfg, fail_at_step=fail_at_step)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


@pytest.mark.parametrize(("stage", "precision"), [(1, "bf16"), (2, "fp32"), (3, "auto")])
def test_zero_stages_train(prepared: Path, tmp_path: Path, stage: int, precision: str) -> None:
    """Every ZeRO stage; bf16 (emulated and slower on an AVX2 CPU, still correct), fp32, and auto (the rule of
    `model.precision` on this CPU) — each recorded in the metrics."""
    run_dir = _run_dir(prepared, tmp_path, f"zero{stage}")
    _train(run_dir, f"train.zero_stage={stage}", f"train.precision={precision}", "train.max_steps=25",
           "train.checkpoint_every=25")
    metrics = _metrics(run_dir)
    expected = ("bf16" if detect().native_bf16 else "fp32") if precision == "auto" else precision
    assert {m.get("precision") for m in metrics if "loss" in m} == {expected}
    assert [m["step"] for m in metrics] == list(range(1, 26))
    first, last = metrics[0], metrics[-1]
    early, late = sum(m["loss"] for m in metrics[:5]) / 5, sum(m["loss"] for m in metrics[-5:]) / 5
    assert late < early - 0.5 and last["val_loss"] < metrics[4]["val_loss"]
    assert all(k in first for k in ("lr", "grad_norm", "tokens_per_sec", "mfu", "elapsed_s"))
    profile = [first[f"time_{k}"] for k in ("data", "forward", "backward", "step")]  # rank 0's step profile
    assert all(0 <= f <= 1 for f in profile) and 0.5 < sum(profile) <= 1.0 and first["time_backward"] > 0
    assert last["val_bpb"] > 0 and 0 < last["mfu"] < 1
    assert list((run_dir / "tb").iterdir())  # TensorBoard events
    model, cfg, _ = load_checkpoint(run_dir / "checkpoint")  # consolidated (ZeRO-3: gathered) weights load
    assert cfg.vocab_size == 512 and json.loads((run_dir / "checkpoint" / "config.json").read_text())["step"] == 25
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.fixture(scope="module")
def uninterrupted(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32, 12 steps, checkpoints every 4: the reference for resume and failure recovery."""
    run_dir = _run_dir(prepared, tmp_path_factory.mktemp("ref"), "run")
    _train(run_dir, "train.precision=fp32", "train.max_steps=12", "train.checkpoint_every=4")
    return run_dir


def test_fp32_resume_after_a_crash_is_bit_identical(prepared: Path, tmp_path: Path, uninterrupted: Path) -> None:
    run_dir = _run_dir(prepared, tmp_path, "resumed")
    args = ("train.precision=fp32", "train.max_steps=12", "train.checkpoint_every=4")
    with pytest.raises(Exception, match="(?i)fail|died|exit"):
        _train(run_dir, *args, fail_at_step=7)  # a worker dies after step 7, no retries: the run fails
    assert json.loads((run_dir / "checkpoint" / "config.json").read_text())["step"] == 4
    _train(run_dir, *args)  # the same command again resumes from step 4
    reference, resumed = _weights(uninterrupted), _weights(run_dir)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    after = {m["step"]: m["loss"] for m in _metrics(run_dir)[-8:]}
    assert after == {m["step"]: m["loss"] for m in _metrics(uninterrupted) if m["step"] > 4}


def test_worker_failure_recovers_to_the_same_weights(prepared: Path, tmp_path: Path, uninterrupted: Path) -> None:
    run_dir = _run_dir(prepared, tmp_path, "killed")
    _train(run_dir, "train.precision=fp32", "train.max_steps=12", "train.checkpoint_every=4",
           "cluster.max_failures=1", fail_at_step=7)  # the last worker dies after step 7; restart from step 4
    steps = [m["step"] for m in _metrics(run_dir)]
    assert steps.count(5) == 2 and steps[-1] == 12  # steps 5-7 were run twice
    reference, recovered = _weights(uninterrupted), _weights(run_dir)
    assert all(torch.equal(reference[k], recovered[k]) for k in reference)


def test_gradient_accumulation_equals_a_larger_batch(prepared: Path, tmp_path: Path) -> None:
    runs = {}
    for name, micro, accum in (("accum", 4, 2), ("big", 8, 1)):
        run_dir = _run_dir(prepared, tmp_path, name)
        _train(run_dir, "train.precision=fp32", "train.max_steps=3", "train.checkpoint_every=3",
               f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}")
        runs[name] = _weights(run_dir)
    for key in runs["big"]:
        assert torch.allclose(runs["accum"][key], runs["big"][key], atol=1e-5), key


def test_bad_setups_fail_before_workers_start(prepared: Path, tmp_path: Path, capsys) -> None:
    run_dir = _run_dir(prepared, tmp_path, "bad")
    assert main(["train", SHAKESPEARE, f"run_dir={run_dir}", *BASE, "model.overrides={vocab_size: 100}"]) == 2
    assert "model.vocab_size 100 ≠ the data's vocabulary 512" in capsys.readouterr().err
    assert main(["train", SHAKESPEARE, f"run_dir={tmp_path / 'empty'}", *BASE]) == 2
    assert "no manifest.json (run `raygpt prepare` first)" in capsys.readouterr().err
    assert main(["train", SHAKESPEARE, f"run_dir={run_dir}", *BASE, "train.precision=fp16"]) == 2
    assert "fp16 needs GPUs" in capsys.readouterr().err
    assert not (run_dir / "metrics.jsonl").exists()


def test_time_budget_stops_every_rank_at_the_same_step(prepared: Path, tmp_path: Path) -> None:
    run_dir = _run_dir(prepared, tmp_path, "budget")
    _train(run_dir, "train.max_steps=1000", "train.time_budget_s=0.001", "train.checkpoint_every=1000")
    assert [m["step"] for m in _metrics(run_dir)] == [1]  # rank 0's clock decided; no rank waited on another
    assert json.loads((run_dir / "checkpoint" / "config.json").read_text())["step"] == 1
