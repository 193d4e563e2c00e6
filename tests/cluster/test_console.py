"""The console of a stage command: raygpt's lines only (stage start/end, progress, summaries), everything else in
RUN_DIR/logs/console.log."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from cluster.console import _Filter, _Shown, quiet_console
from tests.conftest import BASE, REPO, SHAKESPEARE


def test_a_whole_run_prints_a_few_dozen_lines_with_every_stage_summary(shared_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "cluster.cli", "run", SHAKESPEARE, f"run_dir={run_dir}", *BASE,
            "data.tokenizer.vocab_size=512", "data.seq_len=64", "data.shard_bytes=400000", "train.max_steps=20",
            "train.checkpoint_every=10", "train.eval_every=10", "train.log_every=10", "train.precision=fp32",
            "cluster.num_workers=2",
            "eval.tasks=[]", "eval.max_tokens=2000", "quantize.methods=[int8]", "quantize.eval_tasks=false",
            "quantize.decode_tokens=8", "sample.max_new_tokens=8"]
    env = {**os.environ, "RAYGPT_SHARED_DATA": str(shared_data), "RAY_ADDRESS": ""}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    console = (done.stdout + done.stderr).splitlines()
    assert len(console) < 60, "\n".join(console)
    text = "\n".join(console)
    for summary in ("[prepare", "] done in", "[train] done: step 20", "| val | bits_per_byte |", "| int8 | 8 |",
                    "[sample] ", "[run] stage     seconds  result", "[run] report "):
        assert summary in text, summary
    assert "pid=" not in text and " INFO " not in text and "%|" not in text  # no Ray / Ray Data / DeepSpeed chatter
    log = (run_dir / "logs" / "console.log").read_text()
    assert "RayTrainWorker pid=" in log and "[train] done: step 20" in log  # everything is in the log file


def test_the_filter_routes_lines() -> None:
    console, log = io.StringIO(), io.StringIO()
    stream = _Filter(console, log, _Shown())
    lines = [
        "\x1b[36m(RayTrainWorker pid=1)\x1b[0m [train] step 10/20 loss 6.1\n",
        "\x1b[36m(RayTrainWorker pid=2)\x1b[0m [train] step 10/20 loss 6.1\n",  # the same line again: shown once
        "\x1b[36m(TrainController pid=3)\x1b[0m Started training worker group of size 2\n",
        "2026-11-26 10:27:44,064\tINFO worker.py:2038 -- Started a local Ray instance.\n",
        "Reading: 50%|#####     | 1/2 [00:01<00:01]\r",
        "Reading: 100%|##########| 2/2 [00:02<00:00]\n",
        "Generating test split: 0 examples [00:00, ? examples/s]\rGenerating test split: 203 examples [00:00, 5e4/s]\n",
        "\x1b[36m(evaluate_checkpoint pid=4)\x1b[0m Map: 0 examples [00:00, ?]\rMap: 5 examples [00:00, 9.1/s]\n",
        "[prepare    0.3s] reading 1 files\n",
        "raygpt: error: data.seq_len: expected int\n",
    ]
    for line in lines:
        stream.write(line)
    assert console.getvalue() == ("[train] step 10/20 loss 6.1\n[prepare    0.3s] reading 1 files\n"
                                  "raygpt: error: data.seq_len: expected int\n")
    assert log.getvalue() == "".join(lines)


def test_verbose_keeps_the_streams(tmp_path: Path) -> None:
    before = sys.stdout
    with quiet_console(tmp_path / "console.log", verbose=True):
        assert sys.stdout is before
    with quiet_console(tmp_path / "console.log"):
        assert isinstance(sys.stdout, _Filter)
        print("[run] hello")
    assert sys.stdout is before and "[run] hello" in (tmp_path / "console.log").read_text()


def test_warnings_are_dropped_with_their_source_line_but_tracebacks_stay_whole() -> None:
    console = io.StringIO()
    stream = _Filter(console, io.StringIO(), _Shown())
    stream.write("/x/quantize_kernels.py:122: UserWarning: torch.quantize_per_tensor is deprecated\n")
    stream.write("  qw = torch._make_per_channel_quantized_tensor(\n")
    stream.write("Traceback (most recent call last):\n  File \"a.py\", line 1, in <module>\n    x = f()\n")
    stream.write("ValueError: boom\n")
    assert console.getvalue() == ('Traceback (most recent call last):\n  File "a.py", line 1, in <module>\n'
                                  "    x = f()\nValueError: boom\n")
