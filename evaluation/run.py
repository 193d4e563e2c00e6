"""`raygpt eval CONFIG`: every configured checkpoint evaluated in its own Ray task → RUN_DIR/eval/{results.json,report.md}.

    raygpt eval configs/demo.yaml
    raygpt eval configs/demo.yaml eval.checkpoints=[runs/a/checkpoint,runs/b/checkpoint] eval.tasks=[wikitext]

Each task reserves `eval.num_cpus` / `eval.num_gpus`, so several checkpoints run in parallel where resources allow.
Everything checkable (task names, local files, checkpoints) is checked in the driver before any task starts.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import ray

from core import files
from core.files import fingerprint
from core.layout import RunLayout, is_uri
from data_pipeline.manifest import finished
from evaluation.config import EvalConfig, EvalError
from evaluation.tasks import built, code_execution, resolve
from model.checkpoint import CheckpointError, load_config, weights_stamp

def _headline(task_results: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of one lm-eval task result, without stderr entries ("exact_match,strict-match": 0.1)."""
    return {k: v for k, v in task_results.items() if isinstance(v, (int, float)) and "_stderr" not in k and k not in ("alias", "sample_len")}


def answer_format_share(samples: list[dict[str, Any]]) -> float | None:
    """The share of generations from which a task's `strict-match` filter extracts an answer (GSM8K: a reply ending in
    `#### <number>`): whether a model answers in the task's format at all, apart from whether it is right. None
    for a task without that filter."""
    strict = [s for s in samples if s.get("filter") == "strict-match"]
    if not strict:
        return None
    return sum(str(s["filtered_resps"][0]) != "[invalid]" for s in strict) / len(strict)


def run_tasks(lm: Any, cfg: EvalConfig, work_dir: Path) -> dict[str, Any]:
    """The lm-eval tasks of `cfg` on one model (an lm-eval `LM`): {"skipped", "tasks", "lm_eval"}. Code tasks run
    their programs in the sandbox (`evaluation.tasks.code_execution`)."""
    import lm_eval

    # Hugging Face's own code_eval, should any task reach it, runs programs only with this variable: never here
    os.environ.pop("HF_ALLOW_CODE_EVAL", None)
    specs, skipped, manager, runs_code = resolve(cfg, work_dir)
    out: dict[str, Any] = {"skipped": skipped, "tasks": {}}
    if not specs:
        return out
    with code_execution(cfg) if runs_code else contextlib.nullcontext():
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[built(s, manager) for s in specs], task_manager=manager, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            gen_kwargs={"max_gen_toks": cfg.max_gen_toks} if cfg.max_gen_toks else None,
            bootstrap_iters=1000, log_samples=True, confirm_run_unsafe_code=cfg.allow_code_execution,
            apply_chat_template=cfg.apply_chat_template,
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
    out["tasks"] = {task: _headline(r) for task, r in results["results"].items()}
    for task, samples in results.get("samples", {}).items():
        if (share := answer_format_share(samples)) is not None and task in out["tasks"]:
            out["tasks"][task]["format_share,strict-match"] = share
    out["groups"] = {group: list(members) for group, members in results.get("group_subtasks", {}).items()}
    out["lm_eval"] = {
        "results": results["results"], "versions": results.get("versions", {}),
        "n-shot": results.get("n-shot", {}), "n-samples": results.get("n-samples", {}),
        "higher_is_better": results.get("higher_is_better", {}),
        "datasets": {
            t: {k: c.get(k) for k in ("dataset_path", "dataset_name", "dataset_kwargs", "test_split",
                                      "validation_split", "fewshot_split")}
            for t, c in results.get("configs", {}).items()
        },
    }
    return out


def evaluate_checkpoint(checkpoint: str, cfg: EvalConfig, data_dir: str | None, work_dir: str,
                        progress: bool = True, use_gpu: bool | None = None) -> dict[str, Any]:
    """Intrinsic metrics and lm-eval tasks of one checkpoint (runs inside a Ray task, or in-process); `progress`:
    progress lines of the intrinsic scoring; `use_gpu`: whether the task reserved a GPU (default: `eval.num_gpus`,
    the quantize stage passes its own)."""
    from evaluation.intrinsic import score_text, score_val_shards
    from evaluation.lm import RaygptLM
    from model.precision import inference_device

    started = time.perf_counter()
    device = str(inference_device(cfg.num_gpus > 0 if use_gpu is None else use_gpu))
    lm = RaygptLM(checkpoint, batch_size=cfg.batch_size, device=device, dtype=cfg.precision, seed=cfg.seed)
    context = lm.max_length
    stride = min(cfg.stride or context, context)
    out: dict[str, Any] = {
        "checkpoint": str(checkpoint), "step": lm.step, "params": lm.model.num_params(), "device": device,
        "precision": lm.dtype, "context": context, "stride": stride, "intrinsic": {}, "tasks": {},
    }
    if cfg.val_shards and data_dir and (manifest := finished(data_dir)) is not None:
        score = score_val_shards(lm.model, data_dir, context, stride, cfg.batch_size, cfg.max_tokens, progress)
        out["intrinsic"]["val"] = score.to_json()
        sources = manifest.sources
        for source in sources if len(sources) > 1 else []:  # several sources: each one's val bits per byte too
            if source.splits["val"].blocks:
                score = score_val_shards(lm.model, data_dir, context, stride, cfg.batch_size, cfg.max_tokens, progress,
                                         source.name)
                out["intrinsic"][f"val/{source.name}"] = score.to_json()
    skipped = {}
    for name, path in cfg.texts.items():
        if not files.is_file(path):
            skipped[f"texts.{name}"] = f"file not found: {path}"
            continue
        text = files.read_text(path)  # a local file or an object
        score = score_text(lm.model, text, lm.tokenizer, lm.eot_token_id, context, stride, cfg.batch_size, cfg.max_tokens, name, progress)
        out["intrinsic"][name] = score.to_json()
    if cfg.tasks:
        out.update(run_tasks(lm, cfg, Path(work_dir)))
    out["skipped"] = {**skipped, **out.get("skipped", {})}
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out


def check(cfg: EvalConfig, checkpoints: list[str], work_dir: Path) -> None:
    """Fail fast, with one line, on anything that would fail inside a task."""
    for checkpoint in checkpoints:
        try:
            load_config(checkpoint)
        except CheckpointError as e:
            raise EvalError(f"eval.checkpoints: {e}") from None
    for name, path in cfg.texts.items():
        if not files.is_file(path):  # skipped (and said so) rather than failing a run that can evaluate the rest
            print(f"[eval] skipping eval.texts.{name}: file not found: {path}", flush=True)
    if cfg.tasks or cfg.local_data:
        resolve(cfg, work_dir)


def eval_fingerprint(cfg: EvalConfig, checkpoints: list[str]) -> str:
    """Identifies an evaluation: its config and the exact weights of every checkpoint."""
    return fingerprint({"config": cfg.model_dump(mode="json"), "checkpoints": [weights_stamp(c) for c in checkpoints]})


def report_table(results: dict[str, Any], brief: bool = False) -> str:
    """Markdown: one row per (source, metric), one column per checkpoint. `brief` (the console) leaves out the member
    tasks of groups (mmlu's 57 subjects): their group's row stands for them."""
    runs = results["checkpoints"]
    rows: dict[tuple[str, str], list[str]] = {}
    for i, run in enumerate(runs):
        members = {t for group in run.get("groups", {}).values() for t in group} if brief else set()
        for source, metrics in run["intrinsic"].items():
            for metric in ("bits_per_byte", "token_perplexity", "byte_perplexity"):
                rows.setdefault((source, metric), [""] * len(runs))[i] = f"{metrics[metric]:.4f}"
        for task, metrics in run.get("tasks", {}).items():
            if task in members:
                continue
            for metric, value in metrics.items():
                rows.setdefault((task, metric), [""] * len(runs))[i] = f"{value:.4f}"
        for task, reason in run.get("skipped", {}).items():
            rows.setdefault((task, "skipped"), [""] * len(runs))[i] = reason
    header = ["source", "metric", *[f"{Path(r['checkpoint']).name} (step {r['step']})" for r in runs]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join([source, metric, *values]) + " |" for (source, metric), values in rows.items()]
    return "\n".join(lines)


def _gather(refs: list[Any]) -> list[dict[str, Any]]:
    """The tasks' results; a one-line error raised in a task (e.g. a node whose sandbox does not work) stays one line."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, EvalError):
            raise EvalError(str(e.cause)) from None
        raise


def run_eval(cfg: EvalConfig, layout: RunLayout) -> dict[str, Any]:
    """Evaluate every checkpoint as a Ray task (Ray must be connected); skipped when results for the same config and
    weights exist."""
    import lm_eval

    checkpoints = [c if is_uri(c) else str(Path(c)) for c in cfg.checkpoints] or [str(layout.checkpoint)]
    work_dir, data_dir = layout.eval_work, layout.data.root
    work_dir.mkdir(parents=True, exist_ok=True)
    check(cfg, checkpoints, work_dir)
    key = eval_fingerprint(cfg, checkpoints)
    results_path = layout.eval_results
    if (previous := files.completed(results_path, key)) is not None:
        print(f"[eval] {results_path} is complete for this config and these checkpoints; skipping", flush=True)
        print(report_table(previous, brief=True), flush=True)
        return previous
    task = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(evaluate_checkpoint).options(
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cfg.num_cpus)))}}
    )
    refs = [task.remote(c, cfg, str(data_dir), str(work_dir)) for c in checkpoints]
    print(f"[eval] {len(refs)} checkpoint(s): {', '.join(checkpoints)}", flush=True)
    results = {
        "fingerprint": key, "lm_eval_version": lm_eval.__version__, "eval_config": cfg.dump_as_written(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoints": _gather(refs),
    }
    files.write_json(results_path, results)
    table = report_table(results)
    files.atomic_write(layout.eval_report, f"# Evaluation\n\n{table}\n\nlm-eval {lm_eval.__version__}; details in "
                                            f"{str(results_path).rsplit('/', 1)[-1]}.\n")
    print(report_table(results, brief=True), flush=True)  # skipped tasks and texts are rows of it, with the reason
    return results
