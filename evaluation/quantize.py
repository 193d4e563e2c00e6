"""`raygpt quantize CONFIG` and its config section (`QuantizeConfig`): each configured method in its own Ray task → RUN_DIR/quantized/<method>/, then one
report comparing them with full precision (RUN_DIR/quantized/report.json and report.md).

    raygpt quantize configs/demo.yaml
    raygpt quantize configs/demo.yaml quantize.methods=[int8,gptq] quantize.group_size=64

Each task reserves `quantize.num_gpus`; with a GPU, GPTQ/AWQ calibrate on it, evaluation runs on it and phase 2 times
decoding there in bf16 (`model.checkpoint.load_for_inference`).

Phase 1 (parallel tasks): quantize (timing the calibration), save (also in a format transformers loads, in
<method>/hf: bitsandbytes' for bnb-*, compressed-tensors' for the others, which vLLM serves), and evaluate each
checkpoint with the `eval` section (bits per byte on the val shards and texts; its lm-eval tasks too when
`quantize.eval_tasks`); the full-precision checkpoint is evaluated the same way. Phase 2 (one task, so timings do
not compete for cores): each method's KL divergence from full precision's next-token distributions on val blocks,
then decode tokens/s of full precision and every method, measured alternately.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import ray

from core import files
from core.files import fingerprint
from core.layout import Location, RunLayout, is_uri
from core.progress import progress_line
from data_pipeline.manifest import finished, read_manifest
from evaluation.config import EvalConfig, QuantizeConfig  # noqa: F401  # QuantizeConfig re-exported
from evaluation.run import evaluate_checkpoint, report_table
from model.checkpoint import WEIGHTS, CheckpointError, load_config, read_meta, weights_stamp
from model.precision import inference_device
from model.quantize import CALIBRATED, METHODS, QuantizeError, quantize_model

FULL = "fp32"


def _check_data(data_dir: Location, vocab_size: int, needs_calibration: bool) -> None:
    manifest = finished(data_dir)
    if manifest is None:
        if needs_calibration:
            raise QuantizeError(f"gptq/awq need calibration data: no prepared shards at {data_dir} (run raygpt prepare)")
        return
    if manifest.vocab_size != vocab_size:
        raise QuantizeError(f"the checkpoint has vocab_size {vocab_size} but the data in {data_dir} has {manifest.vocab_size}")


def first_blocks(data_dir: Location, split: str, count: int) -> Any:
    """The first `count` blocks of a split as (N, seq_len) int64 token ids (inputs only: the last token is dropped)."""
    import numpy as np
    import torch

    blocks = [b[:-1].astype(np.int64) for _, b in zip(range(count), read_manifest(data_dir).blocks(data_dir, split))]
    return torch.from_numpy(np.stack(blocks)) if blocks else None


def quantize_and_evaluate(
    method: str, cfg: QuantizeConfig, checkpoint: str, layout: RunLayout, eval_cfg: EvalConfig,
) -> dict[str, Any]:
    """One method (or FULL): quantize, save to RUN_DIR/quantized/<method>, evaluate (runs in a Ray task)."""
    from model.checkpoint import load_checkpoint, local_checkpoint, save_checkpoint

    from model.export import ExportError, export

    folder, record, seconds, transformers_dir = local_checkpoint(checkpoint), None, 0.0, None
    location: Location = checkpoint
    device = "cpu"
    if method != FULL:
        # GPTQ/AWQ calibrate on the task's GPU when it reserved one (that is where they are fast); the others only
        # round weights, and bitsandbytes quantizes on its own when a layer moves to a device: both on the CPU
        device = str(inference_device(cfg.num_gpus > 0)) if method in CALIBRATED else "cpu"
        loaded = load_checkpoint(checkpoint, device=device)
        calibration = None
        if method in CALIBRATED:
            calibration = first_blocks(layout.data.root, "train", cfg.calibration_samples).to(device)
        started = time.perf_counter()
        record = quantize_model(loaded.model, method, cfg.group_size, calibration, cfg.act_order, cfg.damp)
        _sync(device)
        seconds = time.perf_counter() - started
        loaded.model.to("cpu")
        extra = {"step": loaded.step, "eot_token": loaded.eot_token, "quantization": record}
        folder = save_checkpoint(loaded.model, layout.quantized_local(method), loaded.tokenizer_file, extra=extra,
                                 replace=True)
        try:  # also in a standard format, as transformers (and vLLM, for compressed-tensors) load it
            export(folder, layout.quantized_hf_local(method), force=True, inside=True)  # the stage owns both
            transformers_dir = str(layout.quantized_hf(method))
        except ExportError as e:
            transformers_dir = f"not exported: {e}"
        location = layout.quantized(method)
        if layout.remote:  # built locally, then uploaded whole; the report written after it is the stage's record
            files.remove(location)
            files.upload_folder(folder, location)
    evaluation = evaluate_checkpoint(str(folder), eval_cfg if cfg.eval_tasks else eval_cfg.model_copy(update={"tasks": []}),
                                     str(layout.data.root), str(layout.quantize_work), progress=False,  # per method instead
                                     use_gpu=cfg.num_gpus > 0)
    return {
        "method": method, "bits": METHODS.get(method, 32), "group_size": (record or {}).get("group_size"),
        "act_order": (record or {}).get("act_order"), "checkpoint": str(location),
        "size_bytes": (folder / WEIGHTS).stat().st_size, "calibration_s": round(seconds, 2),
        "calibration_samples": cfg.calibration_samples if method in CALIBRATED else 0, "calibration_device": device,
        "transformers": transformers_dir, "eval": evaluation,
    }


def _sync(device: Any) -> None:
    """Wait for a GPU's queued work (timings on CUDA are asynchronous otherwise)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def decode_speeds(models: dict[str, Any], new_tokens: int, rounds: int = 3) -> dict[str, float]:
    """Greedy decode tokens/s (batch 1, no early stop) of each model, measured round-robin after a warm-up."""
    import torch

    from model.generate import generate_tokens

    first = next(iter(models.values()))
    device = next(first.parameters()).device
    prompt = (torch.arange(16)[None, :] % first.cfg.vocab_size).to(device)
    new_tokens = min(new_tokens, first.cfg.block_size - 16)

    def run(model: Any) -> float:
        started = time.perf_counter()
        for _ in generate_tokens(model, prompt, new_tokens):
            pass
        _sync(device)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        run(model)
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(run(model))
    return {name: new_tokens / statistics.median(t) for name, t in times.items()}


def output_fidelity(models: dict[str, Any], data_dir: str, blocks: int) -> dict[str, dict[str, float]]:
    """How closely each model's next-token distributions follow full precision's on `blocks` val blocks: mean
    KL(p_fp32 ‖ p_method) in nats per token, and the share of tokens whose top-1 prediction is unchanged. More
    sensitive than bits per byte, which averages out small errors of either sign."""
    import torch
    import torch.nn.functional as F

    ids = first_blocks(data_dir, "val", blocks) if finished(data_dir) is not None else None
    if ids is None:
        return {}
    ids = ids.to(next(models[FULL].parameters()).device)
    sums = {name: [0.0, 0, 0] for name in models}  # KL, same top-1, tokens
    with torch.no_grad():
        for x in ids.split(4):  # a few blocks at a time: (B, T, V) log-probs are large
            reference = F.log_softmax(models[FULL](x)[0].float(), dim=-1)
            for name, model in models.items():
                q = reference if name == FULL else F.log_softmax(model(x)[0].float(), dim=-1)
                sums[name][0] += F.kl_div(q, reference, log_target=True, reduction="sum").item()
                sums[name][1] += int((q.argmax(-1) == reference.argmax(-1)).sum())
                sums[name][2] += reference.shape[0] * reference.shape[1]
    return {name: {"kl_vs_fp32": kl / n, "top1_agreement": same / n} for name, (kl, same, n) in sums.items()}


def resident_bytes() -> int:
    """This process's resident memory, after returning glibc's freed pages to the OS (so that what a model load
    freed is not counted as the model)."""
    import ctypes
    import gc
    import os

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _phase2(folders: dict[str, str], new_tokens: int, data_dir: str, blocks: int, use_gpu: bool,
            gguf: list[str], layout: RunLayout, threads: int) -> dict[str, Any]:
    """One task: output fidelity, then decode speeds (so nothing else competes for the cores while timing), on the
    task's GPU when it reserved one, then the GGUF files in llama.cpp. Fidelity compares fp32 activations (the
    reference is exact); decoding is timed in the precision inference runs in there
    (`model.checkpoint.load_for_inference`: bf16 on a GPU, fp32 on a CPU). Each model's resident memory is this
    process's growth while loading it; the kernels are those its quantized layers chose while decoding."""
    from model.checkpoint import load_for_inference
    from model.quantize_bnb import bitsandbytes
    from model.quantize_kernels import QuantLinear

    if any(name.startswith("bnb") for name in folders):
        bitsandbytes()  # imported before any model is measured: code is not model memory
    memory: dict[str, int] = {}

    def load_all(precision: str) -> tuple[dict[str, Any], str]:
        loaded = {}
        for name, folder in folders.items():
            before = resident_bytes()
            loaded[name] = load_for_inference(folder, use_gpu, precision)
            memory[name] = resident_bytes() - before
        return {name: ckpt.model for name, (ckpt, _) in loaded.items()}, next(iter(loaded.values()))[1].precision

    models, _ = load_all("fp32")
    resident = dict(memory)
    fidelity = output_fidelity(models, data_dir, blocks)
    device = str(next(models[FULL].parameters()).device)
    precision = "fp32"  # on a CPU inference runs in fp32 anyway: the same models are timed
    if device != "cpu":
        del models  # one set of models on the GPU at a time
        models, precision = load_all("auto")
    speeds = decode_speeds(models, new_tokens)
    kernels = {name: sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear) and m.kernel})
               for name, model in models.items()}
    del models
    rows = []
    if gguf:
        from evaluation.quantize_gguf import gguf_rows

        rows = gguf_rows(folders[FULL], gguf, layout, first_blocks(data_dir, "val", blocks), new_tokens, threads)
    return {"fidelity": fidelity, "speeds": speeds, "decode_device": device, "decode_precision": precision,
            "resident_bytes": resident, "kernels": kernels, "gguf": rows}


def _bpb(result: dict[str, Any]) -> float | None:
    intrinsic = result["eval"]["intrinsic"]
    source = "val" if "val" in intrinsic else next(iter(intrinsic), None)
    return intrinsic[source]["bits_per_byte"] if source else None


def comparison_table(report: dict[str, Any]) -> str:
    """The report's table: every method and GGUF file against full precision."""
    lines = [
        "| method | bits | group | size vs fp32 | resident MiB | val bpb | Δ bpb | KL vs fp32 | top-1 same | decode tok/s "
        "| vs fp32 | kernel | calibration s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in [report["full_precision"], *report["methods"], *report.get("gguf", [])]:
        gguf = r["method"].startswith("gguf-")
        resident = r.get("resident_bytes")
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['group_size'] or '-'} | {r['size_vs_fp32']:.3f} "
            f"| {cell(resident / 2**20 if resident is not None else None, '.0f')} "
            f"| {cell(r.get('blocks_bpb') if gguf else r.get('val_bpb'), '.4f')}{' †' if gguf else ''} "
            f"| {cell(r.get('delta_bpb_pct'), '+.2f')}{'%' if r.get('delta_bpb_pct') is not None else ''} "
            f"| {cell(r.get('kl_vs_fp32'), '.5f')} | {cell(r.get('top1_agreement'), '.2%')} "
            f"| {r['decode_tokens_per_s']:.1f} | {r['decode_vs_fp32']:.2f} | {r.get('kernel', '-')} "
            f"| {r.get('calibration_s', '-')} |"
        )
    if report.get("gguf"):
        first = report["gguf"][0]
        lines.append(f"\n† GGUF rows: llama.cpp's bits per byte on the val blocks KL is measured on (fp32 on the same "
                     f"blocks: {first['blocks_bpb_fp32']:.4f}); Δ, KL and decode speed measured in llama.cpp.")
    return "\n".join(lines)


def _fingerprint(cfg: QuantizeConfig, eval_cfg: EvalConfig, checkpoint: Location) -> str:
    return fingerprint({"quantize": cfg.model_dump(mode="json"), "eval": eval_cfg.model_dump(mode="json"),
                        "checkpoint": weights_stamp(checkpoint)})


def run_quantize(cfg: QuantizeConfig, eval_cfg: EvalConfig, layout: RunLayout) -> dict[str, Any]:
    """Every method as a Ray task (Ray must be connected), then the decode timings and the report."""
    checkpoint: Location = cfg.checkpoint or layout.checkpoint
    checkpoint = checkpoint if is_uri(checkpoint) else Path(checkpoint)
    data_dir = layout.data.root
    try:
        model_cfg = load_config(checkpoint)
        meta = read_meta(checkpoint)
    except CheckpointError as e:
        raise QuantizeError(f"quantize.checkpoint: {e}") from None
    if "quantization" in meta:
        raise QuantizeError(f"quantize.checkpoint: {checkpoint} is already quantized ({meta['quantization']['method']})")
    _check_data(data_dir, model_cfg.vocab_size, bool(CALIBRATED & set(cfg.methods)))
    if cfg.gguf:
        from evaluation.quantize_gguf import require_binding
        from model.export import architecture

        require_binding()
        architecture(model_cfg)  # a model GGUF has no family for is refused before any task starts
    key = _fingerprint(cfg, eval_cfg, checkpoint)
    if (report := files.completed(layout.quantize_report, key)) is not None:
        print(f"[quantize] {layout.quantize_report} is complete for this config and checkpoint; skipping", flush=True)
        print(comparison_table(report), flush=True)
        return report

    task = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(quantize_and_evaluate).options(
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cfg.num_cpus)))}}
    )
    methods = [FULL, *cfg.methods]
    print(f"[quantize] {', '.join(cfg.methods)} of {checkpoint}", flush=True)
    refs = {task.remote(m, cfg, str(checkpoint), layout, eval_cfg): m for m in methods}
    results, pending, started = {}, list(refs), time.perf_counter()
    while pending:  # one progress line per finished method
        [ref], pending = ray.wait(pending, num_returns=1)
        results[refs[ref]] = ray.get(ref)
        print(progress_line("quantize", "methods", len(results), len(methods),
                            f"{refs[ref]} after {time.perf_counter() - started:.0f}s"), flush=True)
    results = {m: results[m] for m in methods}
    print(f"[quantize] decode speed and agreement with {FULL} of {len(methods)} checkpoints", flush=True)
    phase2 = ray.get(
        ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(_phase2).remote(
            {m: r["checkpoint"] for m, r in results.items()}, cfg.decode_tokens, str(data_dir), cfg.fidelity_blocks,
            cfg.num_gpus > 0, list(cfg.gguf), layout, max(1, int(cfg.num_cpus)),
        )
    )
    speeds, fidelity = phase2["speeds"], phase2["fidelity"]
    full = results[FULL]
    rows = []
    for method, r in results.items():
        row = {k: r[k] for k in ("method", "bits", "group_size", "act_order", "checkpoint", "size_bytes",
                                 "calibration_s", "calibration_samples", "calibration_device", "transformers")}
        row["decode_device"], row["decode_precision"] = phase2["decode_device"], phase2["decode_precision"]
        row["size_vs_fp32"] = r["size_bytes"] / full["size_bytes"]
        row["size_vs_bf16"] = r["size_bytes"] / (full["size_bytes"] / 2)
        row["val_bpb"] = _bpb(r)
        row["delta_bpb_pct"] = (100 * (row["val_bpb"] / _bpb(full) - 1)) if row["val_bpb"] and method != FULL else None
        row.update(fidelity.get(method, {"kl_vs_fp32": None, "top1_agreement": None}))
        row["resident_bytes"] = phase2["resident_bytes"][method]
        row["kernel"] = ", ".join((["bitsandbytes"] if method.startswith("bnb") else []) + phase2["kernels"][method]
                                  ) or "dense"
        row["decode_tokens_per_s"] = speeds[method]
        row["decode_vs_fp32"] = speeds[method] / speeds[FULL]
        row["eval"] = r["eval"]
        rows.append(row)
        if method != FULL:
            files.write_json(layout.method_report(method), row)
    for row in phase2["gguf"]:
        row["size_vs_fp32"] = row["size_bytes"] / full["size_bytes"]
        row["decode_vs_fp32"] = row["decode_tokens_per_s"] / speeds[FULL]
    report = {"fingerprint": key, "checkpoint": str(checkpoint), "config": cfg.dump_as_written(),
              "full_precision": rows[0], "methods": rows[1:], "gguf": phase2["gguf"]}
    table = comparison_table(report)
    every_metric = report_table({"checkpoints": [r["eval"] for r in rows]})
    calibrated = [r["calibration_device"] for m, r in results.items() if m in CALIBRATED]
    where = (f"GPTQ/AWQ calibrated on {calibrated[0]}; " if calibrated else "") + (
        f"decoding timed on {phase2['decode_device']} in {phase2['decode_precision']}.")
    files.atomic_write(layout.quantize_report_md,
                        f"# Quantization\n\n{table}\n\n{where}\n\nEvery metric, per checkpoint:\n\n{every_metric}\n")
    files.write_json(layout.quantize_report, report)  # last: the stage's completion record
    print(table, flush=True)
    return report
