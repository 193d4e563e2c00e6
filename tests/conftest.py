"""Shared fixtures: the shared test data folder, one local Ray for the whole session, helpers to run the CLI.

    make test      (= .venv/bin/python -m pytest tests)
"""

from __future__ import annotations

import json

import os
import random
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from cluster.ray_connect import start_local
from data_pipeline.config import TokenizerConfig
from data_pipeline.tokenizer import train_tokenizer
from model.gpt import GPT, ModelConfig

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = str(REPO / "configs" / "shakespeare.yaml")
BASE = [  # the debug model on tinyshakespeare shards of vocab 512, seq_len 64: seconds per run
    "model.preset=debug",
    "model.overrides={}",
    "train.micro_batch_size=4",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.eval_every=5",
    "train.eval_batches=2",
    "train.log_every=1",
    "train.time_budget_s=null",
    "cluster.num_workers=2",
]


def shared_data_dir() -> Path:
    """RAYGPT_SHARED_DATA, else ../shared/data beside the repository (see DEVELOPERS.md)."""
    configured = os.environ.get("RAYGPT_SHARED_DATA")
    path = Path(configured) if configured else REPO.parent / "shared" / "data"
    if not (path / "tinyshakespeare" / "input.txt").is_file():
        raise RuntimeError(f"shared test data not found at {path}: set RAYGPT_SHARED_DATA to the shared/data folder")
    return path.resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


S3_PORT = _free_port()
"""The port of the local S3-protocol server (`s3_bucket`). Its address and test credentials are in the environment
from the start, so the local Ray started later (and every worker it spawns) reaches it too."""


@pytest.fixture(scope="session", autouse=True)
def _env(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["RAYGPT_SHARED_DATA"] = str(shared_data)  # configs expand ${RAYGPT_SHARED_DATA}
    os.environ["RAYGPT_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # downloaded checkpoints, metrics mirrors
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Ray Train's controller polls its workers every 2 s (reports, start, end): 0.2 s here takes ~5 s off each of the
    # suite's ~25 training runs (measured: 5 runs 142 → 118 s). Every Ray process started later inherits it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")  # no instance-metadata lookups from a test machine


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    """A real S3-protocol server on 127.0.0.1 (moto's standalone server, as Ray's own storage tests use) with one
    bucket: `s3://raygpt-test`. pyarrow.fs, Ray Train and boto3 find it through AWS_ENDPOINT_URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket="raygpt-test")
    yield "s3://raygpt-test"
    server.stop()


def bucket_copy(folder: Path, uri: str) -> str:
    """Upload a local folder (prepared data) to a prefix of the test bucket; returns the prefix."""
    from core import files

    files.upload_folder(folder, uri)
    return uri


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for every test that needs it (address='local' ignores stale cluster files)."""
    start_local(2, log_to_driver=False)
    yield
    ray.shutdown()


ARCHS = {
    "llama": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2),
    "gpt2": dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True),
}


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:200_000]
    tokenizer = train_tokenizer(iter(text.split("\n\n")), TokenizerConfig(vocab_size=300))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def perturbed_model(arch: str, **overrides: object) -> GPT:
    """A small model whose norms and biases are not at their init values, so export mistakes show."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64), **ARCHS[arch], **overrides})
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Path:
    """tinyshakespeare prepared once per session: RUN_DIR/data with vocab 512, seq_len 64."""
    from cluster.cli import main

    run_dir = tmp_path_factory.mktemp("prepared")
    overrides = ["data.tokenizer.vocab_size=512", "data.seq_len=64", "data.shard_bytes=400000"]
    assert main(["prepare", SHAKESPEARE, f"run_dir={run_dir}", *overrides]) == 0
    return run_dir / "data"


@pytest.fixture(scope="session")
def trained_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with the prepared data and the debug model trained for 60 steps (RUN_DIR/checkpoint)."""
    from cluster import pipeline
    from cluster.config import load_config

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(prepared, run_dir / "data")
    overrides = ["train.max_steps=60", "train.checkpoint_every=60", "train.eval_every=60", "train.log_every=20",
                 "train.precision=fp32", "cluster.num_workers=1", "cluster.cpus_per_worker=1"]
    pipeline.run_train(load_config(SHAKESPEARE, [f"run_dir={run_dir}", *BASE, *overrides]))
    return run_dir


def short_lm_eval_tasks(shared_data: Path, folder: Path) -> tuple[dict, dict]:
    """Two lm-eval tasks on Shakespeare lines short enough for the 64-token test model: multiple choice (scored by
    loglikelihood) and generation."""
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    lines = [line for line in text.splitlines()[-4000:] if 20 < len(line) < 40][:6]  # the end: val-like lines
    rows = [{"prompt": line[:12], "choices": [line[12:], lines[(i + 1) % 6][12:], " and so"], "target": line[12:]}
            for i, line in enumerate(lines)]
    data = folder / "lines.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "doc_to_text": "{{prompt}}", "doc_to_target": 0}
    choice = {**common, "task": "lines_mc", "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
              "metric_list": [{"metric": "acc"}]}
    generate = {**common, "task": "lines_gen", "output_type": "generate_until", "doc_to_target": "{{target}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                "metric_list": [{"metric": "exact_match"}]}
    return choice, generate


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """`n` short arithmetic conversations, in both record shapes a chat source reads: OpenAI `messages` (some with a
    system turn, some two exchanges long) and Alpaca's instruction / input / output."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for i in range(n):
        a, b = rng.randrange(2, 50), rng.randrange(2, 50)
        question, answer = f"What is {a} plus {b}?", f"{a} + {b} = {a + b}\n#### {a + b}"
        if i % 3 == 0:
            rows.append({"instruction": "Add the numbers.", "input": f"{a} and {b}", "output": answer})
            continue
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 1 else []
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 5 == 0:
            messages += [{"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": f"#### {2 * (a + b)}"}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
