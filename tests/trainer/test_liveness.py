"""`trainer.liveness`: a worker recognises its driver's process by pid and start time on the same machine."""

from __future__ import annotations

import subprocess
import sys

from trainer import liveness


def test_a_driver_is_gone_once_its_process_ends_and_a_reused_pid_is_not_it() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import json, sys; from trainer import liveness; "
                              "print(json.dumps(liveness.identity()), flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    import json

    driver = json.loads(child.stdout.readline())
    assert driver["pid"] == child.pid and not liveness.gone(driver)
    child.stdin.close()
    child.wait(timeout=30)
    assert liveness.gone(driver)
    assert liveness.gone({**liveness.identity(), "started": "0"})  # this pid, another start: another process
    assert not liveness.gone(liveness.identity())
    assert not liveness.gone({**driver, "machine": "another machine"}) and not liveness.gone(None)


def test_check_raises_one_line_only_when_the_driver_is_gone() -> None:
    import pytest

    liveness.check(liveness.identity(), 0, 5)  # alive: nothing
    with pytest.raises(liveness.DriverGone, match=r"the driver \(pid \d+\) is gone: rank 1 stops at step 5"):
        liveness.check({**liveness.identity(), "started": "0"}, 1, 5)
