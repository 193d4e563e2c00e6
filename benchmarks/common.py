"""Set-up shared by the benchmarks: a free port, an S3 bucket on moto's server in this process, and the gpt2-124m
data (the Python standard library with a 50,257-token BPE). Imported by the scripts beside it; not run by hand."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def moto_bucket(bucket: str) -> Any:
    """An S3-protocol server on 127.0.0.1 (moto, a dev dependency) with `bucket` created, the AWS_* environment
    pointing at it; returns the server (`.stop()` it at the end)."""
    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket=bucket)
    return server


def gpt2_data(folder: Path, seq_len: int) -> Path:
    """Prepared data whose vocabulary gives gpt2-124m its 124M parameters: the Python standard library source with a
    50,257-token BPE, `seq_len` tokens per sample, into folder/data."""
    from core.layout import RunLayout
    from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
    from data_pipeline.prepare import plan, prepare

    cfg = DataConfig(sources=[SourceConfig(type="python-stdlib")], tokenizer=TokenizerConfig(vocab_size=50257),
                     seq_len=seq_len, overwrite=True, shard_bytes=8_000_000)
    data_dir = RunLayout.of(folder).data.root
    key, resolved, _ = plan(cfg, data_dir)
    prepare(cfg, data_dir, 2, key, resolved)
    return Path(data_dir)
