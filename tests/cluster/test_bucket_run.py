"""A whole run with `run_dir` on object storage (a real S3-protocol server on 127.0.0.1, `s3_bucket`): `raygpt run`
(the suite's one end-to-end run, through the console script) prepares, trains, evaluates, quantizes and samples with
nothing written to a local run directory, printing a few dozen lines; plain webdataset
reads the shards back from the bucket; a second `raygpt run` skips every stage; checkpoint URIs work for generate and
export and are downloaded once; and a manifest whose shard objects are missing, of another size or of other bytes
is refused with one line."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from cluster.cli import main
from core import files
from core.layout import DataLayout, RunLayout, cached_checkpoint, is_uri
from data_pipeline.config import DataError
from data_pipeline.manifest import read_manifest, shard_blocks
from evaluation.lm import RaygptLM
from model import checkpoint as checkpoint_module
from model.checkpoint import CheckpointError, load_checkpoint
from tests.conftest import BASE, REPO, S3_PORT, SHAKESPEARE

TINY = ["data.tokenizer.vocab_size=512", "data.seq_len=64", "data.shard_bytes=400000", *BASE,
        "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=4", "train.precision=fp32",
        "cluster.num_workers=1", "cluster.cpus_per_worker=1", "eval.tasks=[]", "eval.max_tokens=2000",
        "quantize.methods=[int8]", "quantize.gguf=[q8_0]", "quantize.eval_tasks=false", "quantize.decode_tokens=8",
        "sample.max_new_tokens=8"]
CORPUS, TEXT = "s3://raygpt-test/inputs/input.txt", "s3://raygpt-test/inputs/text.txt"
INPUTS = [f"data.sources=[{{path: {CORPUS}, split_by: paragraph}}]", f"eval.texts={{bucket_text: {TEXT}}}"]
"""The corpus and an eval text, read from the bucket too."""


def _objects(uri: str) -> dict[str, int]:
    return {name: size for name, size in files.files_under(uri).items() if not name.endswith("/")}


@dataclass(frozen=True)
class BucketRun:
    uri: str
    """RUN_DIR on the bucket"""
    cwd: Path
    """the empty working directory the command ran in"""
    console: list[str]
    """what the command printed (stdout and stderr)"""


@pytest.fixture(scope="module")
def bucket_run(s3_bucket: str, ray_session: None, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> BucketRun:
    """The suite's one end-to-end run: the real console script (its own process, its own local Ray), `raygpt run`
    with run_dir, the corpus and an eval text on the bucket, from an empty working directory."""
    assert CORPUS.startswith(s3_bucket)
    files.atomic_write(CORPUS, (shared_data / "tinyshakespeare" / "input.txt").read_bytes())
    files.atomic_write(TEXT, (shared_data / "tinyshakespeare" / "input.txt").read_bytes()[:3000])
    cwd = tmp_path_factory.mktemp("cwd")
    run_dir = f"{s3_bucket}/pipeline"
    argv = [sys.executable, "-m", "cluster.cli", "run", SHAKESPEARE, f"run_dir={run_dir}", *TINY, *INPUTS]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}  # S3 endpoint and credentials: tests/conftest.py
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return BucketRun(run_dir, cwd, (done.stdout + done.stderr).splitlines())


def test_the_console_is_a_few_dozen_lines_with_every_stage_summary(bucket_run: BucketRun) -> None:
    """raygpt's lines only (stage start/end, progress, summaries); Ray's, Ray Data's and DeepSpeed's in the log."""
    assert len(bucket_run.console) < 60, "\n".join(bucket_run.console)
    text = "\n".join(bucket_run.console)
    for summary in ("[prepare", "] done in", "[train] done: step 4", "| val | bits_per_byte |", "| int8 | 8 |",
                    "[sample] ", "[run] stage     seconds  result", "[run] report "):
        assert summary in text, summary
    assert "pid=" not in text and " INFO " not in text and "%|" not in text  # no Ray / Ray Data / DeepSpeed chatter
    log = RunLayout.of(bucket_run.uri).console_log.read_text()  # a run on a bucket: the log in the local cache
    assert "RayTrainWorker pid=" in log and "[train] done: step 4" in log  # everything is in the log file


def test_every_stage_writes_only_to_the_bucket(bucket_run: BucketRun, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, cwd = bucket_run.uri, bucket_run.cwd
    layout = RunLayout.of(run_dir)
    objects = _objects(run_dir)
    names = set(objects)
    for expected in ("config.yaml", "data/manifest.json", "data/tokenizer.json", "checkpoint", "train.done.json",
                     "metrics.jsonl", "eval/results.json", "eval/report.md", "quantized/report.json",
                     "quantized/report.md", "quantized/int8/model.safetensors", "quantized/gguf/model-q8_0.gguf",
                     "sample.txt", "report.md",
                     "report/loss.png", "report/quantization.png",
                     "checkpoints/step-000004/commit.json", "checkpoints/step-000004/model/model.safetensors"):
        assert expected in names, expected
    assert any(n.startswith("tb/events.out.tfevents") for n in names)
    assert ".lock" not in names  # the lease was released
    assert list(cwd.iterdir()) == []  # no local run directory (runs/<name>) or anything else appeared
    assert [m for m in files.read_text(layout.metrics).splitlines() if m]  # rank 0's mirror was uploaded
    assert files.read_json(layout.checkpoint)["step"] == 4
    config = files.read_text(layout.config)
    assert CORPUS in config and TEXT in config
    results = files.read_json(layout.eval_results)
    assert {"val", "bucket_text"} <= set(results["checkpoints"][0]["intrinsic"])  # val shards and the text, streamed

    shutil.rmtree(cached_checkpoint("any").parent)  # as on another node: no cached checkpoint copies
    capsys.readouterr()
    assert main(["run", SHAKESPEARE, f"run_dir={run_dir}", *TINY, *INPUTS]) == 0  # complete: each stage skips
    out = capsys.readouterr().out
    assert "already prepared" in out and out.count("is complete for this config") == 3  # train, eval, quantize
    assert main(["prepare", SHAKESPEARE, f"run_dir={run_dir}", *TINY, *INPUTS, "data.seq_len=32"]) == 2
    assert "already holds data prepared from another config" in capsys.readouterr().err  # refused, nothing written
    again = _objects(run_dir)
    assert {k: v for k, v in again.items() if k not in ("sample.txt", "config.yaml")} == \
        {k: v for k, v in objects.items() if k not in ("sample.txt", "config.yaml")}


def test_plain_webdataset_reads_the_shards_from_the_bucket(bucket_run: BucketRun) -> None:
    """No raygpt code on the read side: webdataset fetches each shard over HTTP from the S3 endpoint."""
    run_dir = bucket_run.uri
    data = DataLayout(f"{run_dir}/data")
    manifest = read_manifest(data.root)
    bucket_path = data.root.split("://", 1)[1]
    for split in ("train", "val"):
        for entry in manifest.splits[split].shards:
            url = f"http://127.0.0.1:{S3_PORT}/{bucket_path}/{entry.file}"
            with urllib.request.urlopen(url) as response:
                raw = response.read()
            assert len(raw) == entry.bytes and hashlib.sha256(raw).hexdigest() == entry.sha256
            samples = list(wds.WebDataset(url, shardshuffle=False, empty_check=False))
            assert len(samples) == entry.sequences
            block = np.load(io.BytesIO(samples[0]["input_ids.npy"]))
            assert block.shape == (manifest.seq_len + 1,)


def test_checkpoint_uris_are_downloaded_once_and_verified(
    bucket_run: BucketRun, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = bucket_run.uri
    assert main(["generate", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "5"]) == 0  # a run URI
    assert capsys.readouterr().out.startswith("ROMEO:")
    model_uri = f"{run_dir}/checkpoints/step-000004/model"  # a model folder URI: hashes from its commit record
    assert main(["export", model_uri, "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    first = load_checkpoint(run_dir)
    assert first.step == 4 and first.folder == load_checkpoint(model_uri).folder  # one cached copy, by content
    assert RaygptLM(f"{run_dir}/checkpoint", batch_size=2).step == 4  # lm_eval --model raygpt --model_args pretrained=URI

    read_bytes = files.read_bytes

    def no_download(loc: object) -> bytes:
        # from the bucket only the small pointer object (the cached copy's local files are read as before)
        assert not is_uri(loc) or str(loc) == f"{run_dir}/checkpoint", f"downloaded again: {loc}"
        return read_bytes(loc)

    monkeypatch.setattr(checkpoint_module.files, "read_bytes", no_download)
    again = load_checkpoint(f"{run_dir}/checkpoint")  # the pointer is read, the files come from the cache
    assert again.folder == first.folder and again.step == 4
    monkeypatch.undo()

    pointer = files.read_json(f"{run_dir}/checkpoint")
    pointer["files"]["config.json"]["sha256"] = "0" * 64  # a record that does not match the object
    files.write_json(f"{s3_bucket}/tampered/checkpoint", pointer)
    with pytest.raises(CheckpointError, match="config.json: size or sha256 differs from its record"):
        load_checkpoint(f"{s3_bucket}/tampered")
    assert main(["generate", f"{s3_bucket}/nothing-here", "--prompt", "x"]) == 2
    assert "checkpoint not found: s3://raygpt-test/nothing-here" in capsys.readouterr().err


def test_bad_shards_in_the_bucket_are_one_line(
    bucket_run: BucketRun, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = bucket_run.uri
    cases = {"missing": "missing shard", "size": "corrupt shard", "bytes": "sha256 differs from the manifest"}
    for case, expected in cases.items():
        copy = f"{s3_bucket}/bad-{case}-{tmp_path.name}"
        for name in _objects(f"{run_dir}/data"):
            files.atomic_write(f"{copy}/data/{name}", files.read_bytes(f"{run_dir}/data/{name}"))
        shard = f"{copy}/data/{read_manifest(f'{copy}/data').splits['train'].shards[0].file}"
        raw = files.read_bytes(shard)
        if case == "missing":
            files.remove(shard)
        elif case == "size":
            files.atomic_write(shard, raw + b"\0" * 512)
        else:
            files.atomic_write(shard, raw[:-2] + bytes([raw[-2] ^ 1, raw[-1]]))  # same size, one bit in the padding
        if case == "bytes":  # the driver checks sizes only; the reader hashes each shard as it streams it
            with pytest.raises(DataError, match=expected):
                list(shard_blocks(shard, read_manifest(f"{copy}/data").splits["train"].shards[0].sha256))
            continue
        assert main(["train", SHAKESPEARE, f"run_dir={copy}", *TINY, *INPUTS]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
        assert "checkpoints" not in files.listdir(copy)  # refused before any worker started


def test_a_crashed_prepare_on_the_bucket_completes_identically(
    bucket_run: BucketRun, s3_bucket: str, tmp_path: Path
) -> None:
    """What a prepare that died mid-run leaves in the bucket — no manifest (it is written last), a truncated shard, a
    stale shard — is completed by the re-run to the same objects as the uninterrupted run."""
    run_dir = bucket_run.uri
    copy = f"{s3_bucket}/crashed-{tmp_path.name}"
    original = {name: files.read_bytes(f"{run_dir}/data/{name}") for name in _objects(f"{run_dir}/data")}
    for name, raw in original.items():
        files.atomic_write(f"{copy}/data/{name}", raw)
    files.remove(f"{copy}/data/manifest.json")
    shard = f"{copy}/data/train/shard-000000-0000.tar"
    files.atomic_write(shard, original["train/shard-000000-0000.tar"][:1000])
    files.atomic_write(f"{copy}/data/train/shard-000042-0000.tar", b"stale")
    assert main(["prepare", SHAKESPEARE, f"run_dir={copy}", *TINY, *INPUTS]) == 0
    assert {name: files.read_bytes(f"{copy}/data/{name}") for name in _objects(f"{copy}/data")} == original
