"""The stages of a raygpt run and the main job that chains them: `raygpt run CONFIG`
(prepare → train → eval → quantize → sample).

    raygpt run configs/demo.yaml

Each stage is skipped when its outputs are complete for the same config, so re-running after a failure continues
where it stopped. Prepare is a Ray Data job, train a Ray Train run, eval / quantize / sample Ray tasks with their own
resources; on a cluster (`cluster.address`, RAY_ADDRESS, or inside `raygpt submit`) they all run there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import ray

from cluster import storage
from cluster.config import RunConfig, save_resolved
from cluster.files import fingerprint
from cluster.ray_connect import connect, require_gpus
from data_pipeline.config import DataError
from data_pipeline.manifest import Manifest
from data_pipeline.prepare import plan as data_plan
from data_pipeline.prepare import prepare
from evaluation.quantize import run_quantize
from evaluation.run import run_eval
from model.checkpoint import published_step, weights_stamp
from trainer.checkpoints import run_fingerprint, start_over
from trainer.driver import check_data, check_model, check_resume, train
from trainer.loop import WorkerConfig
from trainer.tracking import tracking_env


def run_prepare(cfg: RunConfig) -> Manifest:
    """Corpus → tokenizer + webdataset shards in RUN_DIR/data. A conflicting data folder is refused before anything
    is written."""
    key, resolved, existing = data_plan(cfg.data, cfg.data_dir)
    if existing is not None:
        print(f"[prepare] {cfg.data_dir} is already prepared from this config and corpus; set data.overwrite=true "
              "to redo", flush=True)
        return existing
    num_cpus = connect(cfg.cluster)
    save_resolved(cfg)
    return prepare(cfg.data, cfg.data_dir, num_cpus, key, resolved)


def run_train(cfg: RunConfig) -> Any:
    """Shards → committed checkpoints, resuming from the newest committed one of the same run. Everything checkable —
    data, model, the run fingerprint against existing checkpoints — fails before any worker starts or file is written."""
    layout = cfg.layout
    manifest = check_data(cfg.data_dir)
    model_cfg = cfg.model.resolve(vocab_size=manifest.vocab_size, block_size=manifest.seq_len)
    if cfg.model.init_from is not None and model_cfg.vocab_size != manifest.vocab_size:
        raise DataError(f"model.init_from {cfg.model.init_from} has {model_cfg.vocab_size} tokens, the prepared data "
                        f"{manifest.vocab_size}: prepare it with that tokenizer (data.tokenizer.path: "
                        f"{cfg.model.init_from}/tokenizer.json)")
    check_model(manifest, model_cfg)
    run_fp = run_fingerprint(cfg.train, model_cfg, manifest, cfg.seed, cfg.global_batch_size)
    if cfg.model.init_from is not None:
        run_fp["model.init_from"] = fingerprint(weights_stamp(cfg.model.init_from))  # other base weights: another run
    done_key = fingerprint({"run": run_fp, "max_steps": cfg.train.max_steps, "time_budget_s": cfg.train.time_budget_s})
    if cfg.train.resume:
        if storage.completed(layout.train_done, done_key) and published_step(layout.checkpoint) is not None:
            print(f"[train] {layout.checkpoint} is complete for this config; skipping", flush=True)
            return None
        resumed = check_resume(layout, run_fp)
        if resumed is not None:
            print(f"[train] resuming from committed checkpoint {resumed.location}", flush=True)
    else:
        for moved in start_over(layout):
            print(f"[train] train.resume=false: moved {moved.name} aside", flush=True)
    connect(cfg.cluster)
    require_gpus("cluster.use_gpu", cfg.cluster.worker_range[0] if cfg.cluster.use_gpu else 0)
    save_resolved(cfg)
    worker = WorkerConfig(train=cfg.train, model=model_cfg, layout=layout, seed=cfg.seed,
                          global_batch=cfg.global_batch_size, use_gpu=cfg.cluster.use_gpu,
                          eot_token=manifest.eot_token, fingerprint=run_fp, init_from=cfg.model.init_from,
                          tracking_env=tracking_env())
    result = train(worker, cfg.cluster)
    step = published_step(layout.checkpoint)
    storage.write_json(layout.train_done, {"fingerprint": done_key, "step": step})
    print(f"[train] done: step {step}, checkpoint {layout.checkpoint}, metrics {layout.metrics}", flush=True)
    return result


def run_evaluation(cfg: RunConfig) -> dict[str, Any]:
    """Checkpoints → RUN_DIR/eval/results.json + report.md, one Ray task per checkpoint."""
    connect(cfg.cluster)
    require_gpus("eval.num_gpus", cfg.eval.num_gpus)
    save_resolved(cfg)
    return run_eval(cfg.eval, cfg.layout)


def run_quantization(cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint → RUN_DIR/quantized/<method>/ for every configured method + report vs full precision."""
    connect(cfg.cluster)
    require_gpus("quantize.num_gpus", cfg.quantize.num_gpus)
    save_resolved(cfg)
    return run_quantize(cfg.quantize, cfg.eval, cfg.layout)


def _sample(checkpoint: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, seed: int,
            compile: bool) -> str:
    """Ray task: the prompt and its generated continuation."""
    import torch

    from model.checkpoint import load_for_inference
    from model.generate import generate

    loaded, _ = load_for_inference(checkpoint)  # the task's GPU when it reserved one
    ids = loaded.tokenizer.encode(prompt, add_special_tokens=False).ids or [loaded.eot_id]
    prompt_ids = torch.tensor([ids[-(loaded.config.block_size - 1) :]], device=next(loaded.model.parameters()).device)
    out = generate(loaded.model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=loaded.eot_id,
                   seed=seed, compile=compile)
    return loaded.tokenizer.decode(out[0].cpu().tolist(), skip_special_tokens=True)


def run_sample(cfg: RunConfig) -> str:
    """The final checkpoint's continuation of `sample.prompt` → RUN_DIR/sample.txt (and printed)."""
    connect(cfg.cluster)
    require_gpus("cluster.use_gpu", 1 if cfg.cluster.use_gpu else 0)  # the sample task's GPU
    s = cfg.sample
    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.cluster.use_gpu else 0)(_sample)
    text = ray.get(task.remote(str(cfg.layout.checkpoint), s.prompt, s.max_new_tokens, s.temperature, s.top_k, s.seed,
                                 s.compile))
    out = storage.write_bytes(cfg.layout.sample, text)
    print(f"[sample] {out}:\n{text}", flush=True)
    return text


def gpu_requests(cfg: RunConfig) -> dict[str, float]:
    """The GPUs each stage's tasks ask for, by the setting that asks."""
    gpus = 1.0 if cfg.cluster.use_gpu else 0.0
    return {"cluster.use_gpu": gpus * cfg.cluster.worker_range[0], "eval.num_gpus": cfg.eval.num_gpus,
            "quantize.num_gpus": cfg.quantize.num_gpus}


STAGES: dict[str, Callable[[RunConfig], Any]] = {
    "prepare": run_prepare, "train": run_train, "eval": run_evaluation, "quantize": run_quantization,
    "sample": run_sample,
}


def run(cfg: RunConfig) -> None:
    """The main job: every stage in order; complete stages skip themselves, so a re-run continues after a failure.
    Ends with the report card and a summary table: each stage's time, what it produced and where. GPUs that a stage
    asks for and a local Ray does not have are refused before the first stage starts."""
    connect(cfg.cluster)
    for setting, count in gpu_requests(cfg).items():
        require_gpus(setting, count)
    results, seconds = {}, {}
    for name, stage in STAGES.items():
        started = time.perf_counter()
        print(f"[run] stage {name}", flush=True)
        results[name] = stage(cfg)
        seconds[name] = time.perf_counter() - started
        print(f"[run] stage {name} done in {seconds[name]:.1f} s", flush=True)
    from cluster.report import write_report  # matplotlib: only when a report is written

    report = write_report(cfg.run_dir)
    print("\n".join(f"[run] {line}" for line in summary(cfg, results, seconds, report)), flush=True)


def summary(cfg: RunConfig, results: dict[str, Any], seconds: dict[str, float], report: Any) -> list[str]:
    """The table `raygpt run` ends with: stage, seconds, the key figure, where its output is."""
    layout = cfg.layout
    metrics = storage.read_text(layout.metrics).splitlines() if storage.is_file(layout.metrics) else []
    last_val = next((json.loads(m) for m in reversed(metrics) if '"val_bpb"' in m), {})
    manifest, evaluation, quantized = results.get("prepare"), results.get("eval"), results.get("quantize")
    figures = {
        "prepare": f"{sum(s.tokens for s in manifest.splits['train'].shards):,} train tokens" if manifest else "",
        "train": f"step {last_val.get('step', '?')}, val {last_val.get('val_bpb', float('nan')):.3f} bits/byte",
        "eval": ", ".join(f"{name} {m['bits_per_byte']:.3f} bpb" for name, m in
                          (evaluation or {"checkpoints": [{"intrinsic": {}}]})["checkpoints"][0]["intrinsic"].items()),
        "quantize": ", ".join(r["method"] for r in (quantized or {}).get("methods", [])),
        "sample": f"{len(results.get('sample') or '')} characters",
    }
    where = {"prepare": layout.data.root, "train": layout.checkpoint, "eval": layout.eval_report,
             "quantize": layout.quantize_report_md, "sample": layout.sample}
    rows = [("stage", "seconds", "result", "output")]
    rows += [(name, f"{seconds[name]:.1f}", figures[name], str(where[name])) for name in STAGES]
    rows.append(("report", "", "loss, throughput, eval, quantization", str(report)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
