"""The run's files have one owner: paths under a run directory are built only by `core.layout`, files are written
only by `core.files` (one atomic write, one atomic folder, one pointer swap), and those hold under concurrency."""

from __future__ import annotations

import ast
import json
import re
import threading
from pathlib import Path

import pytest

from core.errors import RunFileError
from core.files import atomic_folder, completed, point, read_json, write_json
from core.layout import RunLayout
from tests.conftest import REPO

SOURCES = [p for folder in ("core", "cluster", "data_pipeline", "model", "trainer", "evaluation", "benchmarks")
           for p in sorted((REPO / folder).rglob("*.py"))]
RUN_NAMES = {"manifest.json", "metrics.jsonl", "config.yaml", "sample.txt", "results.json", "report.md", "report.json",
             "train.done.json", "commit.json", "checkpoints", "checkpoint", ".lock", "tb", "data", "eval", "quantized",
             "models", "eval-work", "hf", "train", "val", "model", "tokenizer.json"}
"""Names of things under a run directory: joining one onto a path (`x / "eval"`) is building a run path by hand."""
DISTINCT = RUN_NAMES - {"checkpoint", "data", "eval", "train", "val", "model", "hf", "tb", "models", "checkpoints",
                        "tokenizer.json"}
"""The names that are never anything else: they may not appear as a string at all outside the layout."""


def _joined_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every `path / "name"` and `os.path.join(..., "name")` with a run-directory name."""
    found = []
    for node in ast.walk(tree):
        parts: list[ast.expr] = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts = [node.right]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "os.path.join":
            parts = node.args[1:]
        found += [(node.lineno, p.value) for p in parts
                  if isinstance(p, ast.Constant) and isinstance(p.value, str) and p.value.strip("/") in RUN_NAMES]
    return found


def test_no_path_under_the_run_dir_is_built_outside_the_layout() -> None:
    """Every source file is scanned. A line may opt out only by saying why (`# own path: <reason>`): a path inside a
    package, or inside a work folder the layout handed to its stage; there are at most three."""
    offenders, opt_outs = [], []
    for path in SOURCES:
        if path == REPO / "core" / "layout.py":
            continue
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        hits = _joined_names(tree) + [(node.lineno, node.value) for node in ast.walk(tree)
                                      if isinstance(node, ast.Constant) and node.value in DISTINCT]
        for line, name in hits:
            where = f"{path.relative_to(REPO)}:{line} ({name!r})"
            (opt_outs if "# own path: " in lines[line - 1] else offenders).append(where)
    assert not offenders, "run paths built outside core/layout.py:\n" + "\n".join(offenders)
    assert len(opt_outs) <= 3, opt_outs


def test_the_scan_finds_what_it_looks_for() -> None:
    """The scanner itself: it must flag each way a run path can be built by hand."""
    code = 'a = run_dir / "eval"\nb = os.path.join(d, "checkpoint")\nc = x / "ok.bin"\n'
    assert _joined_names(ast.parse(code)) == [(1, "eval"), (2, "checkpoint")]


def test_one_atomic_write_helper() -> None:
    """No second write-to-temp-then-rename, hand-made temp name or delete-then-rename outside core/files.py."""
    pattern = re.compile(r"os\.replace|os\.rename|\.rename\(|shutil\.move|rmtree|\.tmp\b|tmp\w*\.replace\(|\.unlink\(")
    offenders = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in SOURCES if p != REPO / "core" / "files.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, "\n".join(offenders)


def test_concurrent_writers_of_one_file_all_succeed(tmp_path: Path) -> None:
    """20 threads rewriting one file: every write succeeds, the file is always one whole version, no temp is left."""
    target = tmp_path / "state.json"
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(10):
                write_json(target, {"writer": n, "i": i, "pad": "x" * 10_000})
                assert len(read_json(target)["pad"]) == 10_000  # never a torn file
        except BaseException as e:  # noqa: BLE001 — collected and reported by the test
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_folder_pointer_and_records(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RunFileError, match="already exists"):
        with atomic_folder(tmp_path / "out") as tmp:
            pass
    with atomic_folder(tmp_path / "out", replace=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.txt"]

    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    point(tmp_path / "latest", tmp_path / "v1")
    point(tmp_path / "latest", tmp_path / "v2")
    assert (tmp_path / "latest").readlink() == Path("v2")  # relative: the run directory can be moved
    with pytest.raises(RunFileError, match="not a link raygpt made"):
        point(tmp_path / "out", tmp_path / "v1")

    record = tmp_path / "stage.json"
    assert completed(record, "abc") is None
    write_json(record, {"fingerprint": "abc", "n": 1})
    assert completed(record, "abc") == {"fingerprint": "abc", "n": 1} and completed(record, "xyz") is None
    record.write_text('{"fingerprint": "ab')  # truncated by hand
    with pytest.raises(RunFileError, match=r"stage.json: corrupt stage record, not valid JSON .* delete it to redo"):
        completed(record, "abc")


def test_layout_paths() -> None:
    layout = RunLayout.of("/runs/a")
    assert layout.checkpoint_dir(120) == "/runs/a/checkpoints/step-000120"
    assert layout.model_dir(120) == Path("/runs/a/checkpoints/step-000120/model")
    remote = RunLayout.of("/runs/a", "s3://bucket/x")
    assert remote.checkpoint_dir(7) == "s3://bucket/x/checkpoints/step-000007"
    assert remote.model_dir(7) == Path("/runs/a/models/step-000007")  # the published model is always local
    assert layout.data.shard_name("val", 3, 1) == "val/shard-000003-0001.tar"
