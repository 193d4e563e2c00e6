"""The stages of a raygpt run and the main job that chains them: `raygpt run CONFIG`
(prepare → train → finetune → eval → quantize → sample; finetune only with a `finetune:` section).

    raygpt run configs/demo.yaml

Each stage is skipped when its outputs are complete for the same config, so re-running after a failure continues
where it stopped. Prepare is a Ray Data job, train a Ray Train run, eval / quantize / sample Ray tasks with their own
resources; on a cluster (`cluster.address`, RAY_ADDRESS, or inside `raygpt submit`) they all run there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cluster.config import ConfigError, RunConfig, save_resolved
from cluster.ray_connect import connect, require_gpus
from core import files
from core.layout import RunLayout
from core.errors import StageFailed, user_error
from data_pipeline.manifest import Manifest
from data_pipeline.prepare import prepare_stage
from evaluation.quantize import run_quantize
from evaluation.run import run_eval
from model.sample import sample_stage
from trainer.driver import train_stage
from trainer.metrics import read_metrics


def gpu_requests(cfg: RunConfig) -> dict[str, float]:
    """The GPUs each stage's tasks ask for, by the setting that asks."""
    gpus = 1.0 if cfg.cluster.use_gpu else 0.0
    return {"cluster.use_gpu": gpus * cfg.cluster.worker_range[0], "eval.num_gpus": cfg.eval.num_gpus,
            "quantize.num_gpus": cfg.quantize.num_gpus}


def _begin(cfg: RunConfig, gpu_setting: str, gpus: float | None = None) -> Callable[[], int]:
    """What a stage calls once its own checks passed: connect to Ray, refuse GPUs a local Ray lacks (the count that
    `gpu_setting` asks for), and record the resolved config in RUN_DIR/config.yaml. Returns the cluster's CPUs."""

    def begin() -> int:
        num_cpus = connect(cfg.cluster)
        require_gpus(gpu_setting, gpu_requests(cfg)[gpu_setting] if gpus is None else gpus)
        save_resolved(cfg)
        return num_cpus

    return begin


def run_prepare(cfg: RunConfig) -> Manifest:
    """Corpus → tokenizer + webdataset shards in RUN_DIR/data (`data_pipeline.prepare.prepare_stage`)."""
    return prepare_stage(cfg.data, cfg.data_dir, _begin(cfg, "cluster.use_gpu", 0))


def run_train(cfg: RunConfig) -> Any:
    """Shards → committed checkpoints (`trainer.driver.train_stage`)."""
    return train_stage(cfg.train, cfg.model, cfg.cluster, cfg.layout, cfg.seed, cfg.global_batch_size,
                       _begin(cfg, "cluster.use_gpu"), cfg.data.phases())


def run_finetune(cfg: RunConfig) -> Any:
    """The `finetune:` section: conversations → shards with a loss mask in RUN_DIR/finetune/data, then the base model
    trained on them into RUN_DIR/finetune (a run of its own: `RunConfig.finetune_run`). None without the section."""
    if cfg.finetune is None:
        print("[finetune] no finetune section in the recipe; nothing to do", flush=True)
        return None
    run = with_chat_tokens(cfg.finetune_run())
    run_prepare(run)
    return run_train(run)


def with_chat_tokens(run: RunConfig) -> RunConfig:
    """The fine-tuning run as it is, or — when its base tokenizer lacks ChatML's turn tokens — preparing its data
    with the base tokenizer plus those tokens (written to RUN_DIR/finetune/tokenizer.chat.json); the workers then
    give them rows at the mean embedding (`model.vocab`) and the run's fingerprint records them."""
    from tokenizers import Tokenizer

    from model.vocab import extend_tokenizer, missing_chat_tokens

    path = run.data.tokenizer.path
    assert path is not None  # set by finetune_run
    if not files.is_file(path):
        raise ConfigError(f"finetune: no base model tokenizer at {path} (train the base model first, or set "
                          "finetune.init_from to a checkpoint folder)")
    base = Tokenizer.from_str(files.read_text(path))
    if not (missing := missing_chat_tokens(base)):
        return run
    extended = run.layout.extended_tokenizer
    files.atomic_write(extended, extend_tokenizer(base, missing).to_str())
    print(f"[finetune] the base tokenizer has no {' / '.join(missing)}: added as new tokens ({extended})", flush=True)
    tokenizer = run.data.tokenizer.model_copy(update={"path": str(extended)})
    return run.model_copy(update={"data": run.data.model_copy(update={"tokenizer": tokenizer})})


def run_evaluation(cfg: RunConfig) -> dict[str, Any]:
    """Checkpoints → RUN_DIR/eval/results.json + report.md (`evaluation.run.run_eval`); with a finetune section and no
    eval.checkpoints, the base and the fine-tuned checkpoints side by side."""
    _begin(cfg, "eval.num_gpus")()
    eval_cfg = cfg.eval
    if cfg.finetune is not None and not eval_cfg.checkpoints:
        eval_cfg = eval_cfg.model_copy(update={"checkpoints": [cfg.finetune_base, str(cfg.final.layout.checkpoint)]})
    return run_eval(eval_cfg, cfg.layout)


def run_quantization(cfg: RunConfig) -> dict[str, Any]:
    """The final checkpoint (the fine-tuned one when there is one) → FINAL_RUN/quantized/<method>/ + report vs full
    precision (`evaluation.quantize.run_quantize`)."""
    _begin(cfg, "quantize.num_gpus")()
    return run_quantize(cfg.quantize, cfg.eval, cfg.final.layout)


def run_sample(cfg: RunConfig) -> str:
    """The final checkpoint's continuation of `sample.prompt` → FINAL_RUN/sample.txt (`model.sample.sample_stage`)."""
    _begin(cfg, "cluster.use_gpu", 1 if cfg.cluster.use_gpu else 0)()  # the sample task's GPU
    final = cfg.final.layout
    return sample_stage(final.checkpoint, cfg.sample, final.sample, cfg.cluster.use_gpu)


STAGES: dict[str, Callable[[RunConfig], Any]] = {
    "prepare": run_prepare, "train": run_train, "finetune": run_finetune, "eval": run_evaluation,
    "quantize": run_quantization, "sample": run_sample,
}


def run_stage(cfg: RunConfig, name: str) -> Any:
    """One stage by name; a failure that is not the user's (a worker died, a bug) is raised as `StageFailed` naming
    the stage and, for train, the last step logged, with the original error as its cause."""
    try:
        return STAGES[name](cfg)
    except Exception as e:
        if user_error(e) is not None:
            raise
        step = last_step(cfg) if name == "train" else last_step(cfg.final) if name == "finetune" else None
        raise StageFailed(name, step) from e


def last_step(cfg: RunConfig) -> int | None:
    """The last step in the run's metrics (the local mirror: what this node logged last), None before the first."""
    path = cfg.layout.metrics_local
    rows = read_metrics(path.read_text(errors="replace")) if path.is_file() else []
    return rows[-1]["step"] if rows else None


def run(cfg: RunConfig) -> None:
    """The main job: every stage in order; complete stages skip themselves, so a re-run continues after a failure.
    Ends with the report card and a summary table: each stage's time, what it produced and where. GPUs that a stage
    asks for and a local Ray does not have are refused before the first stage starts."""
    connect(cfg.cluster)
    for setting, count in gpu_requests(cfg).items():
        require_gpus(setting, count)
    results, seconds = {}, {}
    for name in STAGES:
        started = time.perf_counter()
        print(f"[run] stage {name}", flush=True)
        results[name] = run_stage(cfg, name)
        seconds[name] = time.perf_counter() - started
        print(f"[run] stage {name} done in {seconds[name]:.1f} s", flush=True)
    from cluster.report import write_report  # matplotlib: only when a report is written

    report = write_report(cfg.run_dir)
    print("\n".join(f"[run] {line}" for line in summary(cfg, results, seconds, report)), flush=True)


def _last_validation(layout: RunLayout) -> dict[str, Any]:
    """The run's last metrics line with a validation result ({} before the first)."""
    metrics = read_metrics(files.read_text(layout.metrics)) if files.is_file(layout.metrics) else []
    return next((m for m in reversed(metrics) if "val_loss" in m), {})


def _finetune_figure(run: RunConfig) -> str:
    """The fine-tuning run's last validation loss (over assistant tokens)."""
    last_val = _last_validation(run.layout)
    return f"step {last_val.get('step', '?')}, val loss {last_val.get('val_loss', float('nan')):.3f} (assistant tokens)"


def summary(cfg: RunConfig, results: dict[str, Any], seconds: dict[str, float], report: Any) -> list[str]:
    """The table `raygpt run` ends with: stage, seconds, the key figure, where its output is."""
    layout = cfg.layout
    last_val = _last_validation(layout)
    manifest, evaluation, quantized = results.get("prepare"), results.get("eval"), results.get("quantize")
    figures = {
        "prepare": f"{sum(s.tokens for s in manifest.splits['train'].shards):,} train tokens" if manifest else "",
        "train": f"step {last_val.get('step', '?')}, val {last_val.get('val_bpb', float('nan')):.3f} bits/byte",
        "eval": ", ".join(f"{name} {m['bits_per_byte']:.3f} bpb" for name, m in
                          (evaluation or {"checkpoints": [{"intrinsic": {}}]})["checkpoints"][0]["intrinsic"].items()),
        "finetune": "" if cfg.finetune is None else _finetune_figure(cfg.final),
        "quantize": ", ".join(r["method"] for r in (quantized or {}).get("methods", [])),
        "sample": f"{len(results.get('sample') or '')} characters",
    }
    final = cfg.final.layout
    where = {"prepare": layout.data.root, "train": layout.checkpoint, "finetune": final.checkpoint if cfg.finetune else "",
             "eval": layout.eval_report, "quantize": final.quantize_report_md, "sample": final.sample}
    rows = [("stage", "seconds", "result", "output")]
    rows += [(name, f"{seconds[name]:.1f}", figures[name], str(where[name])) for name in STAGES]
    rows.append(("report", "", "loss, throughput, eval, quantization", str(report)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
