"""DeepSpeed config generation, LR schedule, weight-decay groups, config checks, the driver's data checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from core.errors import RunFileError
from core.files import sha256
from data_pipeline.config import DataError
from data_pipeline.manifest import FORMAT_VERSION, read_manifest
from model.gpt import GPT, ModelConfig
from tests.conftest import REPO
from tests.trainer.test_data import hand_made_data
from trainer.config import TrainConfig, deepspeed_config, lr_at
from trainer.driver import check_data, check_model
from trainer.loop import param_groups


def test_deepspeed_config_from_the_typed_config() -> None:
    cfg = TrainConfig(micro_batch_size=4, zero_stage=2, precision="bf16", offload_optimizer=True)
    ds = deepspeed_config(cfg, use_gpu=False, precision="bf16", accum=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert "train_batch_size" not in ds
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in deepspeed_config(cfg, use_gpu=True, precision="bf16", accum=1)["optimizer"]["params"]  # FusedAdam on GPU
    fp16 = deepspeed_config(TrainConfig(precision="fp16"), use_gpu=True, precision="fp16", accum=1)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling
    hatch = TrainConfig(deepspeed={"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5})
    merged = deepspeed_config(hatch, use_gpu=False, precision="fp32", accum=1)
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
        (["train.global_batch_size=6", "cluster.num_workers=[2, 8]"],
         r"shakespeare.yaml: config: cluster.num_workers 8 exceeds train.global_batch_size 6: a worker would have no sample$"),
        (["cluster.num_workers=[3, 2]"], r"cluster.num_workers: .*1 ≤ min ≤ max, got \(3, 2\)"),
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


def test_check_data_and_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no manifest.json"):
        check_data(tmp_path / "none")
    data = hand_made_data(tmp_path, [3, 4])
    manifest = check_data(data)
    check_model(manifest, ModelConfig(vocab_size=100, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="model.vocab_size 99 ≠ the data's vocabulary 100"):
        check_model(manifest, ModelConfig(vocab_size=99, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="exceeds model.block_size 2"):
        check_model(manifest, ModelConfig(vocab_size=100, block_size=2, n_layer=1, n_head=1, n_embd=8))
    shard = data / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    assert sha256(shard) != manifest.splits["train"].shards[1].sha256
    with pytest.raises(ValueError, match="corrupt shard .*shard-000001.tar"):
        check_data(data)
    shard.unlink()
    with pytest.raises(ValueError, match="missing shard .*shard-000001.tar"):
        check_data(data)


def test_manifest_reader_errors_are_one_line(tmp_path: Path) -> None:
    """Corrupt or truncated JSON, another format version, a missing field and a shard path leaving the data folder are
    each one line naming the problem."""
    data = hand_made_data(tmp_path, [3])
    path = data / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps(good)[:50])
    with pytest.raises(DataError, match=r"manifest.json: corrupt manifest, not valid JSON") as e:
        read_manifest(data)
    assert "\n" not in str(e.value)
    path.write_text(json.dumps({**good, "format_version": 1}))
    with pytest.raises(DataError, match=f"manifest format 1, this raygpt reads {FORMAT_VERSION}"):
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
