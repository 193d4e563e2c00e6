"""One writer per run_dir (`cluster/run_lock.py`): a second writing command is refused with one line naming the
holder and writes nothing; a holder that died (SIGKILL) does not block; read-only commands take no lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cluster.cli import main
from cluster.run_lock import run_lock
from core.layout import RunLayout
from model.checkpoint import save_checkpoint
from tests.conftest import REPO, SHAKESPEARE, perturbed_model


def test_second_writer_is_refused_and_writes_nothing(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    with run_lock(run_dir, "raygpt train configs/shakespeare.yaml"):
        for command in ("prepare", "train", "eval", "quantize", "sample", "run"):
            assert main([command, SHAKESPEARE, f"run_dir={run_dir}"]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"is in use by pid {os.getpid()}" in err
            assert "raygpt train configs/shakespeare.yaml" in err
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # not even config.yaml
        holder = json.loads(RunLayout.of(run_dir).lock.read_text())
        assert holder["pid"] == os.getpid() and holder["command"].startswith("raygpt train")


def test_a_killed_holder_does_not_block(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code = (f"import time; from cluster.run_lock import run_lock\n"
            f"with run_lock({str(run_dir)!r}, 'holder'):\n    print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = False
        try:
            with run_lock(run_dir, "second"):
                pass
        except Exception as e:  # RunLocked, naming the live holder
            refused = f"pid {holder.pid}" in str(e)
        assert refused
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with run_lock(run_dir, "after the holder died"):  # the kernel released the flock with the process
            assert json.loads(RunLayout.of(run_dir).lock.read_text())["command"] == "after the holder died"
    finally:
        holder.kill()
        holder.stdout.close()


def test_read_only_commands_take_no_lock(tokenizer_file: Path, tmp_path: Path) -> None:
    """export reads a checkpoint inside a locked run_dir without waiting for the lock."""
    run_dir = tmp_path / "run"
    checkpoint = save_checkpoint(perturbed_model("llama"), run_dir / "checkpoint", tokenizer_file)
    with run_lock(run_dir, "raygpt train"):
        assert main(["export", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
