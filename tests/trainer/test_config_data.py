"""DeepSpeed config generation, LR schedule, weight-decay groups, config checks and the resumable shard stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cluster import storage
from cluster.config import ConfigError, load_config
from cluster.files import RunFileError, sha256_file
from data_pipeline.config import DataError
from data_pipeline.manifest import read_manifest
from data_pipeline.shards import write_shard
from model.gpt import GPT, ModelConfig
from trainer.config import TrainConfig, deepspeed_config, lr_at
from trainer.data import Position, ShardStream, read_ahead
from trainer.driver import check_data, check_model
from trainer.loop import param_groups
from tests.conftest import REPO, bucket_copy


def test_deepspeed_config_from_the_typed_config() -> None:
    cfg = TrainConfig(micro_batch_size=4, grad_accum_steps=2, zero_stage=2, precision="bf16", offload_optimizer=True)
    ds = deepspeed_config(cfg, use_gpu=False, precision="bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert "train_batch_size" not in ds
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in deepspeed_config(cfg, use_gpu=True, precision="bf16")["optimizer"]["params"]  # FusedAdam on GPU
    fp16 = deepspeed_config(TrainConfig(precision="fp16"), use_gpu=True, precision="fp16")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling
    hatch = TrainConfig(deepspeed={"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5})
    merged = deepspeed_config(hatch, use_gpu=False, precision="fp32")
    assert merged["zero_optimization"] == {"stage": 1, "overlap_comm": True} and merged["gradient_clipping"] == 0.5


def test_lr_warmup_then_cosine_to_min_lr() -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_and_embeddings() -> None:
    model = GPT(ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == [
        "blocks.0.attn.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.down.weight", "blocks.0.mlp.up.weight"
    ]
    assert {"wte.weight", "wpe.weight", "norm_f.weight", "blocks.0.attn.qkv.bias"} <= {
        names[id(p)] for p in no_decay["params"]
    }
    assert no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.global_batch_size=10", "train.micro_batch_size=4"], r"global_batch_size 10 ≠ micro_batch_size 4 ×"),
        (["train.precision=fp16"], r"fp16 needs GPUs"),
        (["train.offload_params=true"], r"offload_params needs train.zero_stage 3"),
        (["train.zero_stage=4"], r"train.zero_stage: Input should be 0, 1, 2 or 3"),
        (["model.preset=huge"], r"unknown model preset 'huge'"),
        (["model.overrides={n_embd: 30}"], r"n_embd 30 is not divisible by n_head"),
    ],
)
def test_bad_train_configs(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "shakespeare.yaml", overrides)


def _data_dir(tmp_path: Path, shard_sizes: list[int], vocab: int = 100) -> Path:
    """A hand-made prepared data dir: shard s holds blocks whose first id is 1000·s + i."""
    splits = {}
    for split in ("train", "val"):
        (tmp_path / split).mkdir(parents=True)
        shards = []
        for s, n in enumerate(shard_sizes):
            blocks = np.zeros((n, 5), dtype=np.uint16)
            blocks[:, 0] = 1000 * s + np.arange(n)
            name = f"{split}/shard-{s:06d}.tar"
            digest, _ = write_shard(tmp_path / name, blocks, f"{split}-{s}")
            shards.append({"file": name, "sequences": n, "tokens": n * 5, "bytes": (tmp_path / name).stat().st_size,
                           "sha256": digest})
        splits[split] = {"shards": shards, "sequences": sum(shard_sizes), "doc_tokens": 10, "documents": 2,
                         "text_bytes": 40}
    manifest = {"format_version": 2, "fingerprint": "f" * 16, "vocab_size": vocab, "seq_len": 4, "dtype": "uint16",
                "eot_id": 0, "eot_token": "<|endoftext|>", "splits": splits}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def _take(stream: ShardStream, n: int) -> list[int]:
    it = iter(stream)
    return [int(next(it)[0]) for _ in range(n)]


@pytest.mark.parametrize("sizes", [[3, 4, 5, 6, 2], [7]], ids=["shards-split", "samples-split"])
def test_rank_streams_are_disjoint_deterministic_and_cover_each_epoch(tmp_path: Path, sizes: list[int]) -> None:
    data = _data_dir(tmp_path, sizes)
    every = {b for s, n in enumerate(sizes) for b in range(1000 * s, 1000 * s + n)}
    ranks = [ShardStream(data, "train", r, 2, seed=7) for r in range(2)]
    firsts = [_take(ShardStream(data, "train", r, 2, seed=7), 60) for r in range(2)]
    assert firsts == [_take(s, 60) for s in ranks]  # deterministic
    epoch0 = [firsts[r][: _epoch_len(data, r)] for r in range(2)]
    assert set(epoch0[0]).isdisjoint(epoch0[1]) and set(epoch0[0]) | set(epoch0[1]) == every
    assert all(len(set(e)) == len(e) for e in epoch0)  # nothing twice within an epoch
    if len(sizes) > 1:  # another seed, another shard order
        assert _take(ShardStream(data, "train", 0, 2, seed=8), 60) != firsts[0]


def _epoch_len(data: Path, rank: int) -> int:
    stream = ShardStream(data, "train", rank, 2, seed=7)
    return sum(len(range(first, entry.sequences, step)) for _, entry, first, step in stream._epoch(0))


def test_resume_continues_with_exactly_the_next_sample(tmp_path: Path) -> None:
    data = _data_dir(tmp_path, [3, 4, 5, 6, 2])
    reference = _take(ShardStream(data, "train", 1, 2, seed=3), 40)
    for cut in (0, 1, 4, 7, 9, 10, 25):
        stream = ShardStream(data, "train", 1, 2, seed=3)
        head = _take(stream, cut)
        saved = Position.from_json(stream.position.to_json())
        tail = _take(ShardStream(data, "train", 1, 2, seed=3, start=saved), 40 - cut)
        assert head + tail == reference, cut


def test_a_stream_from_the_bucket_equals_the_local_one(tmp_path: Path, s3_bucket: str) -> None:
    """The same blocks in the same order, and the same exact resume, when the shards are streamed from object storage
    (read ahead 2 blocks at a time); a shard object whose bytes differ from the manifest stops the stream."""
    data = _data_dir(tmp_path / "local", [3, 4, 5, 6, 2])
    uri = bucket_copy(data, f"{s3_bucket}/{tmp_path.name}")
    for rank in (0, 1):
        assert _take(ShardStream(uri, "train", rank, 2, seed=3, depth=2), 40) == \
            _take(ShardStream(data, "train", rank, 2, seed=3), 40)
    stream = ShardStream(uri, "train", 1, 2, seed=3, depth=2)
    head = _take(stream, 9)
    tail = _take(ShardStream(uri, "train", 1, 2, seed=3, start=stream.position, depth=2), 11)
    assert head + tail == _take(ShardStream(data, "train", 1, 2, seed=3), 20)

    raw = storage.read_bytes(f"{uri}/train/shard-000002.tar")
    storage.write_bytes(f"{uri}/train/shard-000002.tar", raw[:-1] + bytes([raw[-1] ^ 1]))  # same size, other bytes
    with pytest.raises(DataError, match="corrupt shard .*shard-000002.tar"):
        _take(ShardStream(uri, "train", 0, 1, seed=3), 40)


def test_read_ahead_is_bounded_and_passes_errors_on() -> None:
    produced: list[int] = []

    def items() -> Iterator[int]:
        for i in range(10):
            produced.append(i)
            yield i
        raise ValueError("reader failed")

    stream = read_ahead(items(), depth=2)
    for i in range(4):
        assert next(stream) == i
        assert len(produced) <= i + 1 + 2 + 1  # what was taken, the queue, the one waiting to be put
    with pytest.raises(ValueError, match="reader failed"):
        list(stream)


def test_check_data_and_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no manifest.json"):
        check_data(tmp_path / "none")
    data = _data_dir(tmp_path, [3, 4])
    manifest = check_data(data)
    check_model(manifest, ModelConfig(vocab_size=100, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="model.vocab_size 99 ≠ the data's vocabulary 100"):
        check_model(manifest, ModelConfig(vocab_size=99, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="exceeds model.block_size 2"):
        check_model(manifest, ModelConfig(vocab_size=100, block_size=2, n_layer=1, n_head=1, n_embd=8))
    shard = data / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    assert sha256_file(shard) != manifest.splits["train"].shards[1].sha256
    with pytest.raises(ValueError, match="corrupt shard .*shard-000001.tar"):
        check_data(data)
    shard.unlink()
    with pytest.raises(ValueError, match="missing shard .*shard-000001.tar"):
        check_data(data)


def test_manifest_reader_errors_are_one_line(tmp_path: Path) -> None:
    """Corrupt or truncated JSON, another format version, a missing field and a shard path leaving the data folder are
    each one line naming the problem."""
    data = _data_dir(tmp_path, [3])
    path = data / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps(good)[:50])
    with pytest.raises(DataError, match=r"manifest.json: corrupt manifest, not valid JSON") as e:
        read_manifest(data)
    assert "\n" not in str(e.value)
    path.write_text(json.dumps({**good, "format_version": 1}))
    with pytest.raises(DataError, match="manifest format 1, this raygpt reads 2"):
        read_manifest(data)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "eot_id"}))
    with pytest.raises(DataError, match="bad manifest field eot_id"):
        read_manifest(data)
    outside = json.loads(json.dumps(good))
    outside["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd"
    path.write_text(json.dumps(outside))
    with pytest.raises(RunFileError, match="manifest shard path '../../etc/passwd' points outside"):
        check_data(data)
    (data / "train" / "link.tar").symlink_to("/etc/hostname")
    outside["splits"]["train"]["shards"][0]["file"] = "train/link.tar"  # inside by name, outside through a link
    path.write_text(json.dumps(outside))
    with pytest.raises(RunFileError, match="points outside"):
        list(read_manifest(data).blocks(data, "train"))
