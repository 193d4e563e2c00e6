"""`raygpt train` on local Ray: 2 DeepSpeed workers (gloo on CPU), the debug model, tinyshakespeare shards.
ZeRO 1/2/3 train in bf16 / fp32 / auto, fp32 resume and worker-failure recovery are bit-identical to an uninterrupted run,
a resume at another world size and ZeRO stage trains on the same samples to the same weights (within rounding), any
split of the global batch into micro-batches trains the same weights, and bad setups fail before any worker starts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster import pipeline
from cluster.cli import main
from cluster.config import load_config
from core import files
from core.errors import RunFileError
from core.layout import RunLayout
from model.checkpoint import load_checkpoint
from model.precision import detect
from tests.conftest import BASE, SHAKESPEARE, bucket_copy
from trainer.driver import Interrupted


def _run_dir(prepared: Path, tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(prepared, run_dir / "data")
    return run_dir


def _train(run_dir: Path | str, *overrides: str, faults: dict[str, int] | None = None) -> None:
    """`raygpt train` in this process; `faults` go to the workers through the driver's RAYGPT_TEST_FAULTS."""
    cfg = load_config(SHAKESPEARE, [f"run_dir={run_dir}", *BASE, *overrides])
    if faults:
        os.environ["RAYGPT_TEST_FAULTS"] = json.dumps(faults)
    try:
        pipeline.run_train(cfg)
    finally:
        os.environ.pop("RAYGPT_TEST_FAULTS", None)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


TRACKED = ("train.loggers=[tensorboard,wandb,mlflow]", "train.tracking_project=raygpt-test")
"""The ZeRO-2 run also logs through Ray's W&B and MLflow integrations (`_check_trackers`)."""


@pytest.mark.kernels  # MFU and bf16 against the measured peak
@pytest.mark.parametrize(("stage", "precision"), [(1, "bf16"), (2, "fp32"), (3, "auto")])
def test_zero_stages_train(prepared: Path, tmp_path: Path, stage: int, precision: str,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ZeRO stage; bf16 (emulated and slower on an AVX2 CPU, still correct), fp32, and auto (the rule of
    `model.precision` on this CPU) — each recorded in the metrics. The ZeRO-2 run also logs to W&B and MLflow; the
    ZeRO-3 run validates on one sample (a rank without any joins the forwards: it once waited for ever)."""
    run_dir = _run_dir(prepared, tmp_path, f"zero{stage}")
    tracked = stage == 2
    if tracked:
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # ZeRO-3 with a validation set of one sample: rank 1 has none, and must still join every forward's gathers
    uneven = ("train.micro_batch_size=1", "train.global_batch_size=8", "train.eval_batches=1") if stage == 3 else ()
    _train(run_dir, f"train.zero_stage={stage}", f"train.precision={precision}", "train.max_steps=25",
           "train.checkpoint_every=25", *(TRACKED if tracked else ()), *uneven)
    metrics = _metrics(run_dir)
    expected = ("bf16" if detect().native_bf16 else "fp32") if precision == "auto" else precision
    assert {m.get("precision") for m in metrics if "loss" in m} == {expected}
    assert [m["step"] for m in metrics] == list(range(1, 26))
    seq_len = json.loads((run_dir / "data" / "manifest.json").read_text())["seq_len"]
    global_batch = load_config(SHAKESPEARE, [f"run_dir={run_dir}", *BASE]).global_batch_size  # the one resolved value
    assert [m["tokens"] for m in metrics] == [m["step"] * global_batch * seq_len for m in metrics]
    first, last = metrics[0], metrics[-1]
    early, late = sum(m["loss"] for m in metrics[:5]) / 5, sum(m["loss"] for m in metrics[-5:]) / 5
    assert late < early - 0.5 and last["val_loss"] < metrics[4]["val_loss"]
    assert all(k in first for k in ("lr", "grad_norm", "tokens_per_sec", "mfu", "elapsed_s"))
    profile = [first[f"time_{k}"] for k in ("data", "forward", "backward", "step")]  # rank 0's step profile
    assert all(0 <= f <= 1 for f in profile) and 0.5 < sum(profile) <= 1.0 and first["time_backward"] > 0
    assert last["val_bpb"] > 0 and 0 < last["mfu"] < 1
    assert list((run_dir / "tb").iterdir())  # TensorBoard events
    cfg = load_checkpoint(run_dir / "checkpoint").config  # consolidated (ZeRO-3: gathered) weights load
    model = load_checkpoint(run_dir / "checkpoint").model
    assert cfg.vocab_size == 512 and json.loads((run_dir / "checkpoint" / "config.json").read_text())["step"] == 25
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if tracked:
        _check_trackers(run_dir, [m for m in metrics if "loss" in m], monkeypatch)


REFERENCE = ("train.precision=fp32", "train.checkpoint_every=4", "train.warmup_steps=0", "train.min_lr=3e-3")
"""The reference run's settings: fp32, checkpoints every 4 steps, a constant learning rate (the schedule decays to
max_steps, which a resume at another world size raises leg by leg)."""


@pytest.fixture(scope="module")
def uninterrupted(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 steps of REFERENCE on the default 2 workers, checkpoints written synchronously: the reference for resume,
    resize and failure recovery (which write theirs in the background)."""
    run_dir = _run_dir(prepared, tmp_path_factory.mktemp("ref"), "run")
    _train(run_dir, *REFERENCE, "train.max_steps=12", "train.checkpoint_async=false")
    return run_dir


def test_resumes_at_other_world_sizes_and_zero_stages_train_on_the_same_samples(
    prepared: Path, tmp_path: Path, uninterrupted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """2 workers (ZeRO-1) to step 4 → 1 worker (2 micro-batches each step) to step 8 → 2 workers at ZeRO-3 to step 12,
    against an uninterrupted 2-worker ZeRO-1 run: the same global batch at every step (the digest of its samples), the
    same losses and weights up to the rounding of another reduction order, and one metrics line per step. (A constant
    learning rate: the schedule decays to max_steps, which each leg raises.) train.global_batch_size is unset: the
    1-worker leg keeps the run's recorded 8 (micro 4 × 2 workers) and says so; an explicit other value is refused."""
    common, reference_dir = REFERENCE, uninterrupted
    run_dir = _run_dir(prepared, tmp_path, "resized")
    _train(run_dir, *common, "train.max_steps=4", "cluster.num_workers=2")
    with pytest.raises(RunFileError, match="train.global_batch_size 8 → 4"):
        _train(run_dir, *common, "train.max_steps=8", "cluster.num_workers=1", "train.global_batch_size=4")
    capsys.readouterr()
    _train(run_dir, *common, "train.max_steps=8", "cluster.num_workers=1", "cluster.cpus_per_worker=1")
    assert "[train] train.global_batch_size is unset: keeping this run's global batch of 8" in capsys.readouterr().out
    _train(run_dir, *common, "train.max_steps=12", "cluster.num_workers=2", "train.zero_stage=3")
    resized, reference = _metrics(run_dir), _metrics(reference_dir)
    assert [m["step"] for m in resized] == list(range(1, 13))
    assert [m["world_size"] for m in resized] == [2] * 4 + [1] * 4 + [2] * 4
    assert [m["data_digest"] for m in resized] == [m["data_digest"] for m in reference]
    assert [m["loss"] for m in resized] == pytest.approx([m["loss"] for m in reference], abs=1e-4)
    expected, got = _weights(reference_dir), _weights(run_dir)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-4  # fp32, other reduction orders
    commits = [json.loads((run_dir / "checkpoints" / f"step-{s:06d}" / "commit.json").read_text()) for s in (8, 12)]
    assert [c["world_size"] for c in commits] == [1, 2]


def test_worker_failure_recovers_to_the_same_weights_from_a_bucket(
    prepared: Path, tmp_path: Path, uninterrupted: Path, s3_bucket: str
) -> None:
    """run_dir on an S3 bucket (a local S3-protocol server), the shards streamed from it: the last worker dies after
    step 7, Ray Train replaces it and training resumes from the committed step 4 in the bucket, ending with the same
    weights as the uninterrupted local run. Checkpoints, commit records, the published pointer, metrics and
    TensorBoard all live in the bucket."""
    run_dir = bucket_copy(prepared, f"{s3_bucket}/{tmp_path.name}/data").rsplit("/", 1)[0]
    _train(run_dir, *REFERENCE, "train.max_steps=12", "cluster.max_failures=1", faults={"exit_after_step": 7})
    layout = RunLayout.of(run_dir)
    steps = [json.loads(line)["step"] for line in files.read_text(layout.metrics).splitlines()]
    assert steps == list(range(1, 13))  # steps 5-7 ran twice; the first attempt's lines were dropped on resume
    files.download_folder(layout.tensorboard, tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()  # TensorBoard drops the first attempt's steps 5-7 (the resumed writer's purge_step)
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 13))
    recovered = load_checkpoint(run_dir)  # the published pointer → the cached model of step 12
    reference = _weights(uninterrupted)
    assert recovered.step == 12 and reference.keys() <= recovered.model.state_dict().keys()
    assert all(torch.equal(reference[k], v) for k, v in recovered.model.state_dict().items() if k in reference)

    assert {n for n in files.listdir(layout.checkpoints) if n.startswith("step-")} == {"step-000008", "step-000012"}
    record = files.read_json(f"{layout.checkpoint_dir(12)}/commit.json")
    assert record["step"] == 12 and record["world_size"] == 2
    assert {"state/index.json", "state/rank-00000.safetensors", "state/rank-00001.safetensors"} <= record["files"].keys()
    assert files.read_json(layout.checkpoint)["model"] == layout.model_dir(12)


def test_any_split_of_the_global_batch_trains_the_same_weights(prepared: Path, tmp_path: Path) -> None:
    """Global batch 16 on 2 workers as 1 micro-batch of 8, 2 of 4, or 3 of ≤ 3 (3 + 3 + 2: the short one weighted
    2/3): the same gradient, so the same weights up to float rounding."""
    runs = {}
    for micro in (8, 4, 3):
        run_dir = _run_dir(prepared, tmp_path, f"micro{micro}")
        _train(run_dir, "train.precision=fp32", "train.max_steps=3", "train.checkpoint_every=3",
               "train.global_batch_size=16", f"train.micro_batch_size={micro}")
        runs[micro] = _weights(run_dir)
        assert [m["data_digest"] for m in _metrics(run_dir)] == [m["data_digest"] for m in _metrics(tmp_path / "micro8")]
    for micro in (4, 3):
        for key in runs[8]:
            # Adam divides by √v, so where a gradient is ~0 the rounding of another summation order is amplified:
            # with AVX2 kernels one element of 16,384 came out 1.2e-5 apart (the rest ≤ 6e-6). A wrongly weighted
            # micro-batch moves most elements, by a good part of an Adam step (lr 3e-3).
            diff = (runs[micro][key] - runs[8][key]).abs()
            assert diff.max() < 1e-4 and (diff > 1e-5).float().mean() < 1e-3, (micro, key, float(diff.max()))


def test_bad_setups_fail_before_workers_start(prepared: Path, tmp_path: Path, capsys) -> None:
    run_dir = _run_dir(prepared, tmp_path, "bad")
    assert main(["train", SHAKESPEARE, f"run_dir={run_dir}", *BASE, "model.overrides={vocab_size: 100}"]) == 2
    assert "model.vocab_size 100 ≠ the data's vocabulary 512" in capsys.readouterr().err
    assert main(["train", SHAKESPEARE, f"run_dir={tmp_path / 'empty'}", *BASE]) == 2
    assert "no manifest.json (run `raygpt prepare` first)" in capsys.readouterr().err
    assert main(["train", SHAKESPEARE, f"run_dir={run_dir}", *BASE, "train.precision=fp16"]) == 2
    assert "fp16 needs GPUs" in capsys.readouterr().err
    assert not (run_dir / "metrics.jsonl").exists()


def _committed(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step-*/commit.json"))


def test_crashes_resume_from_the_last_commit_bit_identically(prepared: Path, tmp_path: Path, uninterrupted: Path) -> None:
    """fp32, two crashes in one run: a worker dies after step 7 (no retries: the run fails), and the same command
    resumes from step 4; then rank 0 is SIGKILLed while step 8's checkpoint is in flight (its state file written in the
    background, training already past step 8), so step-000008 is not a checkpoint and the same command again resumes
    from step 4, rewrites step 8 from scratch and ends where an uninterrupted run ends, bit for bit, with every step
    logged once. (The uninterrupted run saved synchronously, this one asynchronously: the same weights.)"""
    run_dir = _run_dir(prepared, tmp_path, "crashed")
    args = (*REFERENCE, "train.max_steps=12")
    with pytest.raises(Exception, match="(?i)fail|died|exit"):
        _train(run_dir, *args, faults={"exit_after_step": 7})
    assert json.loads((run_dir / "checkpoint" / "config.json").read_text())["step"] == 4
    with pytest.raises(Exception):
        _train(run_dir, *args, faults={"kill_in_upload": 8})  # resumed from step 4, killed during step 8's upload
    assert (run_dir / "checkpoints" / "step-000008" / "state").is_dir()  # the files arrived ...
    assert _committed(run_dir) == ["step-000004"]  # ... but only step 4 is committed
    assert os.readlink(run_dir / "checkpoint") == "checkpoints/step-000004/model"
    _train(run_dir, *args)
    assert _committed(run_dir) == ["step-000008", "step-000012"]  # keep_checkpoints=2 pruned step 4
    reference, resumed = _weights(uninterrupted), _weights(run_dir)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, 13))  # no step twice after either resume
    after = {m["step"]: m["loss"] for m in _metrics(run_dir)[-8:]}
    assert after == {m["step"]: m["loss"] for m in _metrics(uninterrupted) if m["step"] > 4}


def _resumes(run_dir: Path) -> list[int]:
    """The steps whose metrics line is the first after a resume (it carries the bytes each rank read)."""
    lines = [m for m in _metrics(run_dir) if "resume_read_bytes" in m]
    for m in lines:  # 2 workers at the ZeRO stage that wrote it: each rank read its own share, ≤ 1/2 + 10%
        assert max(m["resume_read_bytes"]) <= m["resume_state_bytes"] * (1 / 2 + 0.1), m
    return [m["step"] for m in lines]


def test_preemption_notices_checkpoint_the_step_reached_and_lose_none(
    prepared: Path, tmp_path: Path, uninterrupted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fp32, three notices in one run. (1) A worker is sent SIGTERM after step 5 and again while it writes the
    checkpoint that notice causes: it ends at once, that step is not committed (no partial commit) and the run fails;
    the same command resumes from step 4. (2) A worker is sent SIGTERM after step 6: every rank checkpoints the step
    reached and stops, and the driver starts the group again from there. (3) The driver itself is sent SIGTERM (Kubernetes
    deleting its pod) once step 9 is logged: the workers commit the step they reached, and the command ends with one
    line; the same command finishes the run. No step runs twice after a committed notice, and the weights are those of
    the uninterrupted run, bit for bit."""
    run_dir = _run_dir(prepared, tmp_path, "preempted")
    args = (*REFERENCE, "train.max_steps=12")
    with pytest.raises(Exception):
        _train(run_dir, *args, faults={"term_twice_after_step": 5})
    assert _committed(run_dir) == ["step-000004"]
    assert [p for p in (run_dir / "checkpoints").glob("step-*/state") if p.parent.name > "step-000004"]  # in part
    capsys.readouterr()
    _train(run_dir, *args, "train.max_steps=8", faults={"term_after_step": 6})
    # the fault waits until the worker's main thread has handled the signal, so the notice counts at step 6 itself
    found = re.findall(r"\[train\] stopped at step (\d+) \(SIGTERM to a worker\): starting the worker group again from "
                       r"there", capsys.readouterr().out)
    assert found == ["6"]
    assert _resumes(run_dir) == [5, 7]  # from step 4, then from the notice's step: none ran twice

    def terminate_the_driver() -> None:  # once step 9 is logged: SIGTERM to this process, the driver
        while not any(m["step"] >= 9 for m in _metrics(run_dir)):
            threading.Event().wait(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=terminate_the_driver)
    thread.start()
    with pytest.raises(Interrupted, match=r"^stopped by SIGTERM at step \d+ \(committed\); the same command "
                                          r"resumes there$") as stopped:
        _train(run_dir, *args, faults={"step_ms": 1500})  # 3 steps after step 9: time for the notice (1 s polls)
    thread.join()
    at = int(str(stopped.value).split()[5])
    assert 9 <= at < 12
    assert _committed(run_dir)[-1] == f"step-{at:06d}"
    _train(run_dir, *args)
    assert _resumes(run_dir) == [5, 7, 9, at + 1]
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, 13))
    reference, resumed = _weights(uninterrupted), _weights(run_dir)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def _copy_run(source: Path, tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(source, run_dir, symlinks=True)  # RUN_DIR/checkpoint is a relative link: it stays inside the copy
    return run_dir


def test_changed_config_is_refused_and_extended_max_steps_resumes(
    uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy_run(uninterrupted, tmp_path, "changed")
    args = [SHAKESPEARE, f"run_dir={run_dir}", *BASE, *REFERENCE]
    before = {p: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "metrics.jsonl")}
    assert main(["train", *args, "train.max_steps=12", "train.lr=1e-3", "seed=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raygpt: error:") and "\n" not in err
    assert "train.lr 0.003 → 0.001" in err and "seed 1337 → 7" in err and "train.resume=false" in err
    assert {p: p.read_bytes() for p in before} == before  # refused: nothing written, not even config.yaml
    assert main(["train", *args, "train.max_steps=12", "model.overrides={n_layer: 3}"]) == 2  # another model
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.n_layer 2 → 3" in err

    assert main(["train", *args, "train.max_steps=16"]) == 0  # extending max_steps continues the same run
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, 17))
    assert _committed(run_dir) == ["step-000012", "step-000016"]
    assert json.loads((run_dir / "checkpoint" / "config.json").read_text())["step"] == 16

    assert main(["train", *args, "train.max_steps=2", "train.lr=1e-3", "train.resume=false"]) == 0  # start over
    assert [m["step"] for m in _metrics(run_dir)] == [1, 2]
    aside = run_dir / "checkpoints.old-1"
    assert sorted(p.name for p in aside.glob("step-*")) == ["step-000012", "step-000016"]  # moved, not deleted
    assert len((run_dir / "metrics.jsonl.old-1").read_text().splitlines()) == 16
    assert _committed(run_dir) == ["step-000002"]


def test_a_tampered_checkpoint_is_refused_before_anything_is_loaded(
    uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [SHAKESPEARE, *BASE, *REFERENCE, "train.max_steps=13"]
    flipped = _copy_run(uninterrupted, tmp_path, "flipped")
    shard = flipped / "checkpoints" / "step-000012" / "state" / "rank-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in rank 1's optimizer state
    shard.write_bytes(bytes(data))
    assert main(["train", *args, f"run_dir={flipped}"]) == 2
    assert "rank-00001.safetensors: size or sha256 differs from the commit record" in capsys.readouterr().err
    extra = _copy_run(uninterrupted, tmp_path, "extra")
    (extra / "checkpoints" / "step-000012" / "state" / "evil.pt").write_bytes(b"not in the record")
    assert main(["train", *args, f"run_dir={extra}"]) == 2
    assert "state/evil.pt is not in the commit record" in capsys.readouterr().err
    assert not (flipped / "checkpoints" / "step-000013").exists() and not (extra / "checkpoints" / "step-000013").exists()
    old_style = _copy_run(uninterrupted, tmp_path, "old-style")  # RUN_DIR/checkpoint as an older raygpt wrote it
    (old_style / "checkpoint").unlink()
    shutil.copytree(uninterrupted / "checkpoint", old_style / "checkpoint")
    assert main(["train", *args, f"run_dir={old_style}"]) == 2
    assert "checkpoint is a folder, not the link raygpt publishes" in capsys.readouterr().err


def test_a_second_train_on_the_same_run_dir_is_refused_and_the_first_stops_at_its_time_budget(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While a train holds the run dir, a second one is refused in one line; the first stops when its time budget is
    spent, every rank at the same step (rank 0's clock decides; no rank waits on another) and checkpoints there."""
    run_dir = _run_dir(prepared, tmp_path, "concurrent")
    args = ["train", SHAKESPEARE, f"run_dir={run_dir}", *BASE, "train.max_steps=1000", "train.time_budget_s=0.001",
            "train.checkpoint_every=1000"]
    second: list[int] = []

    def second_writer() -> None:  # waits until the first command holds the lock, then tries the same run_dir
        while not (run_dir / ".lock").is_file() or not (run_dir / ".lock").read_text().strip():
            threading.Event().wait(0.05)
        second.append(main(args))

    thread = threading.Thread(target=second_writer)
    thread.start()
    assert main(args) == 0  # the first command, in this thread (Ray Train wants the main thread)
    thread.join()
    assert second == [2]
    assert "is in use by pid" in capsys.readouterr().err
    assert [m["step"] for m in _metrics(run_dir)] == [1] and _committed(run_dir) == ["step-000001"]
    assert json.loads((run_dir / "checkpoint" / "config.json").read_text())["step"] == 1


def test_training_starts_from_an_imported_checkpoint(prepared: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Continued pretraining: a transformers Llama (vocab of the prepared data's tokenizer) → `raygpt import` →
    `model.init_from`. At lr 1e-6 two Adam steps move no weight by more than ~2e-6, so the trained checkpoint is the
    imported one (a random init differs by ~0.02); another base checkpoint is another run (one line), and so is an
    override of its architecture."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.export import hf_tokenizer

    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                      tie_word_embeddings=True, eos_token_id=0, bos_token_id=0))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    hf_tokenizer(prepared / "tokenizer.json", "<|endoftext|>").save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "base")]) == 0
    base = load_checkpoint(tmp_path / "base").model.state_dict()

    run_dir = _run_dir(prepared, tmp_path, "continued")
    continued = [f"model.init_from={tmp_path / 'base'}", "train.precision=fp32", "train.lr=1e-6", "train.min_lr=0",
                 "train.max_steps=2",
                 "train.checkpoint_every=2"]
    _train(run_dir, *continued)
    trained = load_checkpoint(run_dir / "checkpoint").model.state_dict()
    assert set(trained) == set(base) and max((trained[k] - base[k]).abs().max().item() for k in base) < 1e-4
    assert load_checkpoint(run_dir / "checkpoint").config.n_embd == 64  # the imported architecture, not the preset

    other = tmp_path / "other-base"
    shutil.copytree(tmp_path / "base", other)
    (other / "model.safetensors").touch()  # other weights as far as the fingerprint knows (a new mtime)
    os.utime(other / "model.safetensors", ns=(1, 1))
    args = ["train", SHAKESPEARE, f"run_dir={run_dir}", *BASE, *continued[1:], "train.max_steps=3"]
    assert main([*args, f"model.init_from={other}"]) == 2
    assert "model.init_from" in capsys.readouterr().err
    assert main([*args, f"model.init_from={tmp_path / 'base'}", "model.overrides={n_layer: 3}"]) == 2
    assert "model.overrides.n_layer: the architecture comes from model.init_from" in capsys.readouterr().err


def _check_trackers(run_dir: Path, logged: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    """`train.loggers` through Ray's W&B and MLflow integrations, offline: W&B in offline mode, MLflow's file store
    in RUN_DIR/mlruns; what they recorded is read back and equals metrics.jsonl."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the file store raygpt wrote
    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "raygpt-test"]
    [run] = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(h.step, round(h.value, 5)) for h in history] == [(m["step"], round(m["loss"], 5)) for m in logged]
    assert run.info.run_name == run_dir.name and run.data.params["train.max_steps"] == str(logged[-1]["step"])

    [offline] = list((run_dir / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    records = _wandb_records(offline)
    [run_record] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.display_name == run_dir.name and run_record.project == "raygpt-test"
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    losses = [(h["_step"], round(h["loss"], 5)) for h in history if "loss" in h]
    assert losses == [(m["step"], round(m["loss"], 5)) for m in logged]


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file: LevelDB-log framing (7-byte file header; 32 KiB blocks of
    chunks with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST). wandb 0.31 ships no Python reader."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records
