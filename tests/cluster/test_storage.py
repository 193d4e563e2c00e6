"""Object storage through `core.files` and the lease lock of `cluster.run_lock`, against a real S3-protocol server
on 127.0.0.1 (`s3_bucket`): objects round-trip, folders upload and download, every bad location is one line (unknown
bucket, missing credentials, unreachable endpoint after bounded retries, unsupported scheme), and a run_dir on the
bucket is locked by a lease object that a second writer cannot take and a dead holder's expiry frees."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import boto3
import pytest

from cluster import run_lock as lock_module
from cluster.cli import main
from cluster.run_lock import RunLocked, run_lock
from core import files, object_store
from core.layout import RunLayout
from tests.conftest import SHAKESPEARE


def test_objects_and_folders_round_trip(s3_bucket: str, tmp_path: Path) -> None:
    root = f"{s3_bucket}/{tmp_path.name}"
    files.write_json(f"{root}/a/record.json", {"fingerprint": "k"})
    assert files.read_json(f"{root}/a/record.json") == {"fingerprint": "k"}
    assert files.completed(f"{root}/a/record.json", "k") == {"fingerprint": "k"}
    assert files.completed(f"{root}/a/record.json", "other") is None
    assert files.completed(f"{root}/a/missing.json", "k") is None
    with files.output(f"{root}/b.bin") as f:
        f.write(b"x" * 3000)
    assert files.size(f"{root}/b.bin") == 3000 and files.size(f"{root}/none") is None
    with pytest.raises(RuntimeError), files.output(f"{root}/never.bin") as f:
        f.write(b"half")
        raise RuntimeError("writer died")
    assert not files.is_file(f"{root}/never.bin")  # a failed writer publishes nothing
    with files.staged_folder(f"{root}/folder") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.txt").write_text("1")
        (tmp / "y.txt").write_text("22")
    assert files.files_under(f"{root}/folder") == {"sub/x.txt": 1, "y.txt": 2}
    with files.staged_folder(f"{root}/folder") as tmp:  # replaced whole: y.txt is gone
        (tmp / "z.txt").write_text("333")
    assert files.files_under(f"{root}/folder") == {"z.txt": 3}
    files.download_folder(f"{root}/folder", tmp_path / "down")
    assert (tmp_path / "down" / "z.txt").read_text() == "333"
    with files.open_read(f"{root}/b.bin", buffer_size=1024) as f:
        assert len(f.read(100)) == 100
    assert files.listdir(root) == ["a", "b.bin", "folder"]
    files.remove(f"{root}/folder")
    assert not files.is_dir(f"{root}/folder") and files.listdir(f"{root}/nothing") == []
    with pytest.raises(files.RunFileError, match="corrupt record, not valid JSON"):
        files.atomic_write(f"{root}/bad.json", "{not json")
        files.read_json(f"{root}/bad.json", "record")


@pytest.mark.parametrize("case", ["unknown bucket", "unreachable endpoint", "missing credentials", "unsupported scheme"])
def test_a_bad_location_is_one_line(
    case: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = f"{s3_bucket}/bad-location"
    if case == "unknown bucket":
        run_dir, expected = "s3://no-such-bucket/run", "bucket 'no-such-bucket' does not exist"
    elif case == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens on port 1
        expected = f"cannot reach http://127.0.0.1:1 (gave up after {object_store.ATTEMPTS} attempts)"
    elif case == "missing credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")  # not this machine's ~/.aws either
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
        expected = "no AWS credentials found"
    else:
        run_dir, expected = "ftp://host/run", "unsupported location"
    for command in ("prepare", "train", "run"):
        assert main([command, SHAKESPEARE, f"run_dir={run_dir}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    monkeypatch.undo()
    assert not files.listdir(f"{s3_bucket}/bad-location")  # nothing was written


def test_a_run_dir_on_the_bucket_is_locked_by_a_lease(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = f"{s3_bucket}/{tmp_path.name}"
    lease = str(RunLayout.of(run_dir).lock)
    with run_lock(run_dir, "raygpt train first"):
        holder = files.read_json(lease)
        assert holder["pid"] == os.getpid() and holder["command"] == "raygpt train first"
        assert holder["expires"] > time.time()
        with pytest.raises(RunLocked, match=f"is in use by pid {os.getpid()} .*raygpt train first"):
            with run_lock(run_dir, "second"):
                pass
        assert main(["prepare", SHAKESPEARE, f"run_dir={run_dir}"]) == 2
        assert "is in use by" in capsys.readouterr().err
        assert files.listdir(run_dir) == [".lock"]  # the refused command wrote nothing
    assert not files.is_file(lease)  # released

    # a holder that died: its lease is not renewed and expires; the next command takes it over
    dead = {"pid": 1, "host": "gone", "command": "raygpt train", "since": "then", "owner": "x", "expires": time.time() - 1}
    files.write_json(lease, dead)
    with run_lock(run_dir, "after the holder died"):
        assert files.read_json(lease)["command"] == "after the holder died"
    assert "took over the expired lock of pid 1 on gone" in capsys.readouterr().out

    # the holder renews its lease while it runs
    monkeypatch.setattr(lock_module, "LEASE_S", 0.4)
    with run_lock(run_dir, "renewing"):
        first = files.read_json(lease)["expires"]
        deadline = time.monotonic() + 10
        while files.read_json(lease)["expires"] == first:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_the_lease_is_created_with_a_conditional_put(s3_bucket: str, tmp_path: Path) -> None:
    """The store itself refuses the second create: exactly one of two writers of a new lease object succeeds."""
    bucket, key = s3_bucket.split("://")[1], f"{tmp_path.name}/.lock"
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps({"n": 1}).encode(), IfNoneMatch="*")
    with pytest.raises(client.exceptions.ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=bucket, Key=key, Body=json.dumps({"n": 2}).encode(), IfNoneMatch="*")
    assert json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read()) == {"n": 1}
