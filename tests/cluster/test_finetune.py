"""`raygpt finetune` on local Ray (2 DeepSpeed workers, gloo): the base model of a run trained on conversations'
assistant tokens. The logged loss is the mean over the trained tokens of the whole global batch (checked by hand
against the base model), the weights are the same at world sizes 1 and 2, a changed recipe is refused like any
changed run, and a base whose tokenizer lacks the chat tokens is extended (rows at the mean embedding, recorded in
the run's fingerprint)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from cluster import pipeline
from cluster.cli import main
from cluster.config import load_config
from core.chat import CHAT_TOKENS, CHATML
from data_pipeline.config import TokenizerConfig
from data_pipeline.manifest import read_manifest
from data_pipeline.tokenizer import train_tokenizer
from model.checkpoint import load_checkpoint, save_checkpoint
from model.gpt import GPT, ModelConfig
from tests.conftest import BASE, SHAKESPEARE, chat_records, write_jsonl
from trainer.loop import model_batch
from trainer.mixture import Sources


def _section(base: Path, chats: Path) -> str:
    """The finetune section: 3 fp32 steps of 8 conversation blocks of 65 tokens."""
    return (f"finetune={{init_from: {base}, data: {{sources: [{{path: {chats}, format: chat}}], seq_len: 64, "
            "val_fraction: 0.1}, train: {micro_batch_size: 4, global_batch_size: 8, lr: 1e-3, warmup_steps: 1, "
            "max_steps: 3, checkpoint_every: 3, eval_every: 3, eval_batches: 1, log_every: 1, precision: fp32}}")


def _finetune_args(run_dir: Path, base: Path, chats: Path, *extra: str) -> list[str]:
    return ["finetune", SHAKESPEARE, f"run_dir={run_dir}", *BASE, _section(base, chats), *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", chat_records(400))


def test_finetune_averages_over_the_global_batchs_assistant_tokens_at_any_world_size(
        trained_run: Path, chats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = trained_run / "checkpoint"
    assert main(_finetune_args(tmp_path / "two", base, chats)) == 0
    run = tmp_path / "two" / "finetune"
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss_tokens"] > 0 for m in metrics)

    # step 1's loss by hand: the base model on the global batch's 8 blocks, summed over the masked targets / count
    manifest = read_manifest(run / "data")
    ids = Sources(manifest, None, 1337).order.global_batch(0, 8)
    blocks = np.stack([b for i, b in enumerate(_all_blocks(run / "data")) if i in set(ids.tolist())])
    inputs, targets, extra = model_batch(blocks, manifest, torch.device("cpu"))
    model = load_checkpoint(base).model.train()
    with torch.no_grad():
        total = model(inputs, targets=targets, **extra)[1]
    count = int((targets >= 0).sum())
    assert metrics[0]["loss_tokens"] == count
    assert abs(metrics[0]["loss"] - total.item() / count) < 1e-4
    halves = [slice(0, 4), slice(4, 8)]  # each rank's part of the global batch
    per_rank = [model(inputs[h], targets=targets[h], **{**extra, "segments": extra["segments"][h]})[1].item()
                / int((targets[h] >= 0).sum()) for h in halves]
    assert abs(np.mean(per_rank) - total.item() / count) > 1e-3  # a mean of per-rank means would show

    finetuned = load_checkpoint(run / "checkpoint")
    assert finetuned.chat_template == CHATML and finetuned.config.vocab_size == load_checkpoint(base).config.vocab_size

    assert main(_finetune_args(tmp_path / "one", base, chats, "cluster.num_workers=1")) == 0
    one, two = load_file(str(tmp_path / "one" / "finetune" / "checkpoint" / "model.safetensors")), \
        load_file(str(run / "checkpoint" / "model.safetensors"))
    assert max((one[k] - two[k]).abs().max().item() for k in two) < 1e-4
    assert [m["data_digest"] for m in _metrics(tmp_path / "one" / "finetune")] == [m["data_digest"] for m in metrics]

    capsys.readouterr()
    changed = _finetune_args(tmp_path / "two", base, chats, "finetune.train.lr=2e-3")
    assert main(changed) == 2
    assert "train.lr" in capsys.readouterr().err

    # what `raygpt run` does after the finetune stage: eval compares base and fine-tuned; quantize and sample work
    # on the fine-tuned run (its chat data calibrates)
    after = ["eval.tasks=[]", "eval.texts={}", "quantize.methods=[int8]", "quantize.gguf=[]",
             "quantize.calibration_samples=8", "sample.max_new_tokens=8"]
    cfg = load_config(SHAKESPEARE, [f"run_dir={tmp_path / 'two'}", *BASE, _section(base, chats), *after])
    for stage in ("eval", "quantize", "sample"):
        pipeline.run_stage(cfg, stage)
    results = json.loads((tmp_path / "two" / "eval" / "results.json").read_text())
    assert [c["checkpoint"] for c in results["checkpoints"]] == [str(base), str(run / "checkpoint")]
    assert (run / "quantized" / "int8" / "model.safetensors").is_file() and (run / "sample.txt").is_file()


def _all_blocks(data: Path) -> list[np.ndarray]:
    from trainer.data import SampleReader

    reader = SampleReader(data, "train")
    blocks = list(reader.read_many(np.arange(reader.num_samples)))
    reader.close()
    return blocks


def test_a_base_without_chat_tokens_is_extended_at_the_mean_embedding(tmp_path: Path, shared_data: Path,
                                                                       chats: Path) -> None:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:100_000]
    plain = train_tokenizer(iter(text.split("\n\n")), TokenizerConfig(vocab_size=400, special_tokens=["<|endoftext|>"]))
    plain.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = ModelConfig.preset("debug", vocab_size=400, block_size=64)
    base = save_checkpoint(GPT(cfg), tmp_path / "base", tmp_path / "tokenizer.json")
    assert load_checkpoint(base).chat_template is None
    args = _finetune_args(tmp_path / "run", base, chats, "finetune.train.lr=1e-9", "finetune.train.max_steps=1",
                          "finetune.train.checkpoint_every=1")
    assert main(args) == 0
    run = tmp_path / "run" / "finetune"
    tuned = load_checkpoint(run / "checkpoint")
    assert tuned.config.vocab_size == 402 and tuned.chat_template == CHATML
    assert [tuned.tokenizer.token_to_id(t) for t in CHAT_TOKENS] == [400, 401]
    old = load_checkpoint(base).model.wte.weight.detach()
    new = tuned.model.wte.weight.detach()
    assert (new[:400] - old).abs().max() < 1e-5 and (new[400:] - old.mean(0)).abs().max() < 1e-5
    commit = json.loads(next((run / "checkpoints").glob("step-*/commit.json")).read_text())
    assert commit["fingerprint"]["model.init_from.added_tokens"] == {"400": CHAT_TOKENS[0], "401": CHAT_TOKENS[1]}
    assert Tokenizer.from_file(str(run / "tokenizer.chat.json")).get_vocab_size() == 402
