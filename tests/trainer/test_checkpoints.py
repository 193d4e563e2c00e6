"""The commit protocol's bookkeeping without Ray: which folders count as checkpoints, verification against the commit
record, pruning, fingerprint differences. (The protocol under real Ray Train + DeepSpeed is in test_train.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import RunFileError
from core.files import file_records
from core.layout import RunLayout
from trainer import checkpoints


def _checkpoint(layout: RunLayout, step: int, commit: bool = True) -> Path:
    folder = Path(layout.checkpoint_dir(step))
    (folder / "ds").mkdir(parents=True)
    (folder / "ds" / "shard.pt").write_bytes(b"weights %d" % step)
    (folder / "raygpt_state_rank0.json").write_text("{}")
    if commit:
        checkpoints.commit(layout, step, {"train.lr": 0.1}, 2, file_records(folder))
    return folder


def test_only_committed_folders_count_and_prune_keeps_the_newest(tmp_path: Path) -> None:
    layout = RunLayout.of(tmp_path)
    assert checkpoints.newest(layout) is None  # no checkpoints folder at all
    for step in (4, 8, 12):
        _checkpoint(layout, step)
    _checkpoint(layout, 16, commit=False)  # a crash between the files and the commit record
    (tmp_path / "checkpoints" / "not-a-step").mkdir()
    assert [c.step for c in checkpoints.committed(layout)] == [4, 8, 12]
    assert checkpoints.newest(layout).record["world_size"] == 2
    checkpoints.prune(layout, keep=2)
    assert sorted(checkpoints.step_folders(layout)) == [8, 12, 16]  # 16 is newer than the newest commit: kept
    checkpoints.remove_steps(layout, [16])
    assert sorted(checkpoints.step_folders(layout)) == [8, 12]
    (tmp_path / "checkpoints" / "step-000012" / "commit.json").write_text('{"version": 1, "ste')
    with pytest.raises(RunFileError, match="step-000012/commit.json: corrupt commit record"):
        checkpoints.committed(layout)


def test_verify_refuses_any_difference_from_the_record(tmp_path: Path) -> None:
    layout = RunLayout.of(tmp_path)
    folder = _checkpoint(layout, 4)
    record = json.loads((folder / "commit.json").read_text())
    checkpoints.verify(folder, record)
    (folder / "ds" / "shard.pt").write_bytes(b"weights 5")  # same size, other bytes
    with pytest.raises(RunFileError, match="ds/shard.pt: size or sha256 differs from the commit record"):
        checkpoints.verify(folder, record)
    (folder / "ds" / "shard.pt").unlink()
    with pytest.raises(RunFileError, match="ds/shard.pt is missing"):
        checkpoints.verify(folder, record)
    (folder / "ds" / "shard.pt").write_bytes(b"weights 4")
    (folder / "ds" / "extra.pt").write_bytes(b"")
    with pytest.raises(RunFileError, match="ds/extra.pt is not in the commit record"):
        checkpoints.verify(folder, record)


def test_fingerprint_differences_and_rank_file_merge() -> None:
    old = {"train.lr": 0.003, "train.betas": [0.9, 0.95], "seed": 1}
    assert checkpoints.differences(old, {**old, "train.betas": (0.9, 0.95)}) == []  # tuples equal lists
    assert checkpoints.differences(old, {**old, "train.lr": 0.001, "seed": 2}) == ["seed 1 → 2", "train.lr 0.003 → 0.001"]
    same = {"a": {"bytes": 1, "sha256": "x"}}
    assert checkpoints.merge_files([same, same, {"b": {"bytes": 2, "sha256": "y"}}]) == {**same, "b": {"bytes": 2, "sha256": "y"}}
    with pytest.raises(RunFileError, match="two ranks wrote different a"):
        checkpoints.merge_files([same, {"a": {"bytes": 1, "sha256": "z"}}])


@pytest.mark.parametrize(("drop", "message"), [("fingerprint", "no 'fingerprint' mapping"),
                                               ("files", "no 'files' mapping"), ("step", "'step' is not a step number")])
def test_a_commit_record_of_the_wrong_shape_is_one_line(tmp_path: Path, drop: str, message: str) -> None:
    """A commit.json without fingerprint or files (or step) is refused naming the file, not a KeyError later."""
    layout = RunLayout.of(tmp_path)
    folder = _checkpoint(layout, 4)
    record = json.loads((folder / "commit.json").read_text())
    (folder / "commit.json").write_text(json.dumps({k: v for k, v in record.items() if k != drop}))
    with pytest.raises(RunFileError, match=rf"step-000004/commit.json: {message}.*; move that checkpoint away"):
        checkpoints.newest(layout)


def test_metrics_drop_a_torn_line_and_never_repeat_a_step(tmp_path: Path) -> None:
    """A torn last line (a killed run) is dropped on resume; a resume keeps only the steps up to its checkpoint, and
    a start with no checkpoint (the first attempt was killed before its first commit) keeps none, so the re-run never
    logs a step twice."""
    from trainer.metrics import continue_metrics, read_metrics

    layout = RunLayout.of(tmp_path)
    rows = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7))
    layout.metrics_local.write_text(rows + '{"step": 7, "lo')
    assert [r["step"] for r in read_metrics(layout.metrics_local.read_text())] == [1, 2, 3, 4, 5, 6]
    continue_metrics(layout, 4)
    assert [r["step"] for r in read_metrics(layout.metrics_local.read_text())] == [1, 2, 3, 4]
    assert layout.metrics_local.read_text().count("\n") == 4  # the file itself is clean again
    continue_metrics(layout, None)
    assert layout.metrics_local.read_text() == ""
    assert [r["step"] for r in read_metrics(rows + rows)] == list(range(1, 7))  # one row per step


def test_a_background_save_uploads_the_metrics_as_they_were_when_it_was_taken(s3_bucket: str, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An async checkpoint uploads the run's metrics from its writer thread while the loop appends the next lines: it
    uploads the length taken at the save (whole lines), never a line being written."""
    from core import files
    from trainer.metrics import metrics_length, read_metrics, upload_metrics

    monkeypatch.setenv("RAYGPT_CACHE", str(tmp_path / "cache"))
    layout = RunLayout.of(f"{s3_bucket}/{tmp_path.name}")
    layout.metrics_local.parent.mkdir(parents=True, exist_ok=True)
    layout.metrics_local.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 5)))
    length = metrics_length(layout)
    with open(layout.metrics_local, "a") as f:
        f.write('{"step": 5, "lo')  # the loop, half way through its next line
    upload_metrics(layout, length)
    text = files.read_text(layout.metrics)
    assert text.endswith("\n") and [r["step"] for r in read_metrics(text)] == [1, 2, 3, 4]
    assert all(json.loads(line) for line in text.splitlines())
