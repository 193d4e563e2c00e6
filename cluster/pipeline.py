"""The stages of a raygpt run and the main job that chains them: `raygpt run CONFIG`
(prepare → train → eval → quantize → sample).

    raygpt run configs/demo.yaml

Each stage is skipped when its outputs are complete for the same config, so re-running after a failure continues
where it stopped. Prepare is a Ray Data job, train a Ray Train run, eval / quantize / sample Ray tasks with their own
resources; on a cluster (`cluster.address`, RAY_ADDRESS, or inside `raygpt submit`) they all run there.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.train import ScalingConfig

from cluster.config import RunConfig, save_resolved
from cluster.ray_connect import connect
from data_pipeline.prepare import prepare
from evaluation.quantize import run_quantize
from evaluation.run import run_eval
from trainer.driver import check_data, check_model, train


def run_prepare(cfg: RunConfig) -> dict[str, Any]:
    """Corpus → tokenizer + webdataset shards in RUN_DIR/data."""
    num_cpus = connect(cfg.cluster)
    save_resolved(cfg)
    return prepare(cfg.data, cfg.data_dir, num_cpus)


def run_train(cfg: RunConfig, fail_at_step: int | None = None) -> Any:
    """Shards → checkpoints (resuming from the newest one in storage). Everything checkable fails before workers start."""
    manifest = check_data(cfg.data_dir)
    model_cfg = cfg.model.resolve(vocab_size=manifest["vocab_size"], block_size=manifest["seq_len"])
    check_model(manifest, model_cfg)
    connect(cfg.cluster)
    save_resolved(cfg)
    c = cfg.cluster
    scaling = ScalingConfig(
        num_workers=c.num_workers,
        use_gpu=c.use_gpu,
        resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})},
        placement_strategy=c.placement_strategy,
    )
    storage = c.storage_path or str((Path(cfg.run_dir) / "train").resolve())
    marker, key = Path(cfg.run_dir) / TRAIN_COMPLETE, _train_fingerprint(cfg, model_cfg, manifest)
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == key and (Path(cfg.run_dir) / "checkpoint").is_dir():
        print(f"[train] {cfg.run_dir}/checkpoint is complete for this config; skipping", flush=True)
        return None
    result = train(
        cfg.train, model_cfg, cfg.data_dir, Path(cfg.run_dir), cfg.seed, scaling, storage, c.max_failures,
        c.num_to_keep, manifest["eot_token"], fail_at_step,
    )
    marker.write_text(json.dumps({"fingerprint": key}))
    return result


def _train_fingerprint(cfg: RunConfig, model_cfg: Any, manifest: dict[str, Any]) -> str:
    parts = [cfg.train.model_dump_json(), model_cfg.model_dump_json(), manifest["config_hash"], str(cfg.seed),
             str(cfg.cluster.num_workers)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


TRAIN_COMPLETE = "train_complete.json"  # fingerprint of the finished training's config


def run_evaluation(cfg: RunConfig) -> dict[str, Any]:
    """Checkpoints → RUN_DIR/eval/results.json + report.md, one Ray task per checkpoint."""
    connect(cfg.cluster)
    save_resolved(cfg)
    return run_eval(cfg.eval, Path(cfg.run_dir), cfg.data_dir)


def run_quantization(cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint → RUN_DIR/quantized/<method>/ for every configured method + report vs full precision."""
    connect(cfg.cluster)
    save_resolved(cfg)
    return run_quantize(cfg.quantize, cfg.eval, Path(cfg.run_dir), cfg.data_dir)


def _sample(checkpoint: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, seed: int) -> str:
    """Ray task: the prompt and its generated continuation."""
    import torch

    from data_pipeline.tokenizer import load_tokenizer
    from model.checkpoint import CONFIG, load_checkpoint
    from model.generate import generate

    model, _, tokenizer_path = load_checkpoint(checkpoint)
    tokenizer = load_tokenizer(tokenizer_path)
    eot = tokenizer.token_to_id(json.loads((Path(checkpoint) / CONFIG).read_text()).get("eot_token", "<|endoftext|>"))
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eot]
    prompt_ids = torch.tensor([ids[-(model.cfg.block_size - 1) :]])
    out = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=eot, seed=seed)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)


def run_sample(cfg: RunConfig) -> str:
    """The final checkpoint's continuation of `sample.prompt` → RUN_DIR/sample.txt (and printed)."""
    connect(cfg.cluster)
    s = cfg.sample
    checkpoint = str(Path(cfg.run_dir) / "checkpoint")
    text = ray.get(ray.remote(num_cpus=1)(_sample).remote(checkpoint, s.prompt, s.max_new_tokens, s.temperature,
                                                            s.top_k, s.seed))
    out = Path(cfg.run_dir) / "sample.txt"
    out.with_suffix(".tmp").write_text(text)
    out.with_suffix(".tmp").replace(out)
    print(f"[sample] {out}:\n{text}", flush=True)
    return text


STAGES: dict[str, Callable[[RunConfig], Any]] = {
    "prepare": run_prepare, "train": run_train, "eval": run_evaluation, "quantize": run_quantization,
    "sample": run_sample,
}


def run(cfg: RunConfig) -> None:
    """The main job: every stage in order; complete stages skip themselves, so a re-run continues after a failure."""
    for name, stage in STAGES.items():
        started = time.perf_counter()
        print(f"[run] stage {name}", flush=True)
        stage(cfg)
        print(f"[run] stage {name} done in {time.perf_counter() - started:.1f} s", flush=True)
