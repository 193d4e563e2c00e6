"""Progress lines: one format, and a throttled log that a quick loop keeps silent."""

from __future__ import annotations

import pytest

from core.progress import PROGRESS, Progress, progress_line


def test_a_progress_line_is_recognised_by_its_pattern() -> None:
    match = PROGRESS.match(progress_line("train", "step", 120, 400, "loss 3.2 eta 12s"))
    assert match is not None and (match["stage"], match["done"], match["total"], match["percent"]) == ("train", "120", "400", "30")
    assert match["rest"] == " loss 3.2 eta 12s"


def test_progress_prints_at_most_every_interval_and_at_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress("eval", "loglikelihood", 1000, every_s=3600, unit="requests")
    for _ in range(1000):
        progress.update()
    assert capsys.readouterr().out == ""  # a loop quicker than the interval prints nothing
    progress = Progress("eval", "windows", 3, every_s=0)
    for _ in range(3):
        progress.update()
    assert [line.split(" (")[0] for line in capsys.readouterr().out.splitlines()] == [
        "[eval] windows 1/3", "[eval] windows 2/3", "[eval] windows 3/3"]
    progress = Progress("eval", "loglikelihood", 1000, every_s=0, unit="requests")
    progress.update(400)  # an interval passed: shown
    progress.every_s = 3600
    progress.update(300)  # within the interval: not shown
    progress.update(300)  # the end, after a shown line: shown
    first, last = capsys.readouterr().out.splitlines()
    assert first.startswith("[eval] loglikelihood 400/1000 (40%) ") and last.startswith("[eval] loglikelihood 1000/1000 (100%) ")
    assert last.endswith(" requests/s")
