"""The console of a stage command: raygpt's lines only (stage start/end, progress, summaries), everything else in
RUN_DIR/logs/console.log. (The console of a whole `raygpt run` is checked on the suite's one end-to-end run, in
test_bucket_run.py.)"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from cluster.console import _Bar, _Filter, _Shown, quiet_console
from cluster.console import draw_bar as _draw
from core.progress import progress_line
from tests.conftest import SHAKESPEARE


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


def test_on_a_terminal_progress_lines_are_one_live_bar_with_other_lines_above_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    out, err, log = io.StringIO(), io.StringIO(), io.StringIO()
    bar, shown = _Bar(out), _Shown()
    stdout, stderr = _Filter(out, log, shown, bar), _Filter(err, log, shown, bar)
    stdout.write("(RayTrainWorker pid=1) " + progress_line("train", "step", 10, 40, "loss 6.1 eta 30s") + "\n")
    stdout.write("(RayTrainWorker pid=1) " + progress_line("train", "step", 20, 40, "loss 5.2 eta 20s") + "\n")
    stderr.write("raygpt: a warning of our own\n")
    stdout.write("(RayTrainWorker pid=1) " + progress_line("train", "step", 40, 40, "loss 4.0 eta 0s") + "\n")
    bar.finish()
    first = "[train] step " + "━" * 7 + "─" * 23 + " 10/40 eta 30s loss 6.1"  # the eta first, then the details
    half = "[train] step " + "━" * 15 + "─" * 15 + " 20/40 eta 20s loss 5.2"
    done = "[train] step " + "━" * 30 + " 40/40 eta 0s loss 4.0"
    # each state redraws the bottom line; the other line goes to its own stream while the bar is cleared and redrawn
    assert out.getvalue() == f"\r\x1b[K{first}\r\x1b[K{half}\r\x1b[K{half}\r\x1b[K{done}\n"  # done: it stays
    stdout.write("[run] stage eval\n")
    assert out.getvalue().endswith(f"{done}\n[run] stage eval\n")  # below the finished bar, which is not redrawn
    assert err.getvalue() == "raygpt: a warning of our own\n"
    long = progress_line("train", "step", 1, 4, " ".join(f"metric_{i} 1.0" for i in range(20)) + " eta 9s")
    assert _draw(long, 79).startswith("[train] step " + "━" * 5 + "─" * 15 + " 1/4 eta 9s metric_0 1.0 ")
    assert len(_draw(long, 79)) == 79  # cut to the terminal's width
    assert log.getvalue().count("[train] step") == 3  # the log keeps every progress line


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


def test_a_failed_stage_is_one_line_naming_the_stage_step_and_log(tmp_path: Path, ray_session: None,
                                                                  monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A failure that is not the user's (here a real Ray task raising, as a dying worker does) is one console line:
    the stage, the last step logged, the root cause and where the whole traceback is; `--verbose` raises it whole."""
    import json

    import ray

    from cluster import pipeline
    from cluster.cli import main
    from core.errors import StageFailed

    @ray.remote
    def worker() -> None:
        raise RuntimeError("the worker lost its device")

    def train(cfg: object) -> None:
        cfg.layout.metrics_local.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
        ray.get(worker.remote())

    monkeypatch.setitem(pipeline.STAGES, "train", train)
    run_dir = tmp_path / "run"
    assert main(["train", SHAKESPEARE, f"run_dir={run_dir}"]) == 1
    err = capsys.readouterr().err
    log = run_dir / "logs" / "console.log"
    assert err == (f"raygpt: error: stage train failed at step 3: RuntimeError: the worker lost its device (the whole "
                   f"traceback is in {log}; --verbose shows it)\n")
    assert "Traceback" in log.read_text() and "raise RuntimeError" in log.read_text()
    with pytest.raises(StageFailed, match="stage train failed at step 3"):
        main(["--verbose", "train", SHAKESPEARE, f"run_dir={run_dir}"])


def test_a_full_disk_leaves_the_console_working(capsys) -> None:
    """Writing the log fails with ENOSPC (/dev/full): one warning, and the command's lines still reach the console
    (it used to end with exit status 120, "lost sys.stderr")."""
    with quiet_console(Path("/dev/full")):
        print("[train] step 1/2", flush=True)
        print("[train] done", flush=True)
    out = capsys.readouterr().out
    assert out.splitlines() == ["[run] warning: the log file cannot be written (No space left on device); console only",
                                "[train] step 1/2", "[train] done"], out
