"""The report card of a run: RUN_DIR/report.md and its plots in RUN_DIR/report/, from what the stages wrote.

    raygpt report runs/demo          # also written at the end of `raygpt run`

Training and validation loss and validation bits per byte against tokens seen, throughput and MFU over the run
(RUN_DIR/metrics.jsonl), the evaluation table (RUN_DIR/eval/results.json) and the quantization table with its
trade-off plot: size against Δ bits per byte, decode speed as colour (RUN_DIR/quantized/report.json). A stage that
has not run is said so. Works on a local run directory or one on object storage; every file is written atomically.
"""

from __future__ import annotations

import io
from typing import Any

from core import files
from core.errors import RunFileError
from core.layout import Location, RunLayout
from trainer.metrics import read_metrics

PLOTS = "report"
"""Folder of the PNGs beside report.md (RunLayout.report_plot), as report.md links them."""


def _read_metrics(loc: Location) -> list[dict[str, Any]]:
    return read_metrics(files.read_text(loc)) if files.is_file(loc) else []


def _tokens_per_step(metrics: list[dict[str, Any]]) -> int | None:
    """Global batch × sequence length, as the trainer recorded it (`tokens` in metrics.jsonl: the tokens seen by a
    step); None for metrics written before it was recorded."""
    counted = [m for m in metrics if m.get("tokens") and m.get("step")]
    return counted[-1]["tokens"] // counted[-1]["step"] if counted else None


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _training_plots(metrics: list[dict[str, Any]], tokens_per_step: int | None) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    scale, unit = (tokens_per_step / 1e6, "tokens (millions)") if tokens_per_step else (1, "step")
    x = lambda rows: [r["step"] * scale for r in rows]  # noqa: E731
    train = [m for m in metrics if "loss" in m]
    val = [m for m in metrics if "val_loss" in m]
    plots = {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(x(train), [m["loss"] for m in train], label="train loss", lw=1)
    if val:
        left.plot(x(val), [m["val_loss"] for m in val], "o-", label="validation loss", ms=3)
        right.plot(x(val), [m["val_bpb"] for m in val], "o-", color="tab:green", ms=3)
    left.set(xlabel=unit, ylabel="cross-entropy (nats / token)", title="Loss")
    left.legend()
    left.grid(alpha=0.3)
    right.set(xlabel=unit, ylabel="bits per byte", title="Validation bits per byte")
    right.grid(alpha=0.3)
    plots["loss.png"] = _png(fig)
    plt.close(fig)
    timed = [m for m in train if "tokens_per_sec" in m]
    if timed:
        steps = [m["step"] for m in timed]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
        left.plot(steps, [m["tokens_per_sec"] for m in timed], color="tab:blue", lw=1)
        left.set(xlabel="step", ylabel="tokens / s (all workers)", title="Throughput")
        right.plot(steps, [100 * m.get("mfu", 0) for m in timed], color="tab:orange", lw=1)
        right.set(xlabel="step", ylabel="MFU (% of the hardware's peak)", title="Model FLOPs utilization")
        for ax in (left, right):
            ax.grid(alpha=0.3)
        plots["throughput.png"] = _png(fig)
        plt.close(fig)
    return plots


def _quantization_plot(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [report["full_precision"], *report["methods"], *report.get("gguf", [])]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [r["size_bytes"] / 1e6 for r in rows]
    deltas = [r.get("delta_bpb_pct") or 0.0 for r in rows]
    speeds = [r.get("decode_vs_fp32", 1.0) for r in rows]
    low, high = min(speeds), max(speeds)
    points = None
    for marker, gguf in (("o", False), ("s", True)):  # raygpt's checkpoints round, llama.cpp's GGUF files square
        chosen = [i for i, r in enumerate(rows) if r["method"].startswith("gguf-") == gguf]
        if chosen:
            points = ax.scatter([sizes[i] for i in chosen], [deltas[i] for i in chosen], c=[speeds[i] for i in chosen],
                                cmap="viridis", vmin=low, vmax=high, s=80, marker=marker, edgecolors="black")
    for r, size, delta in zip(rows, sizes, deltas):
        ax.annotate(r["method"], (size, delta), textcoords="offset points", xytext=(6, 4), fontsize=9)
    fig.colorbar(points, ax=ax, label="decode speed vs fp32 (×)")
    ax.set(xlabel="checkpoint size (MB)", ylabel="Δ validation bits per byte vs fp32 (%)",
           title="Quantization: size, quality and speed")
    ax.axhline(0, color="gray", lw=0.8)
    ax.grid(alpha=0.3)
    data = _png(fig)
    plt.close(fig)
    return data


def _quantization_table(report: dict[str, Any]) -> str:
    lines = ["| method | size (MB) | × fp32 size | resident MiB | bpb | Δ bpb | KL vs fp32 | top-1 agree | decode × fp32 "
             "| kernel |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in [report["full_precision"], *report["methods"], *report.get("gguf", [])]:
        delta = "" if r.get("delta_bpb_pct") is None else f"{r['delta_bpb_pct']:+.2f}%"
        bpb = r.get("blocks_bpb", r.get("val_bpb"))
        resident = "-" if r.get("resident_bytes") is None else f"{r['resident_bytes'] / 2**20:.0f}"
        lines.append(f"| {r['method']} | {r['size_bytes'] / 1e6:.1f} | {r['size_vs_fp32']:.3f} | {resident} | "
                     f"{bpb:.4f} | {delta} | {r['kl_vs_fp32']:.5f} | {100 * r['top1_agreement']:.1f}% | "
                     f"{r['decode_vs_fp32']:.2f} | {r.get('kernel', '-')} |")
    if report.get("gguf"):
        lines.append("\nGGUF rows (llama.cpp): bits per byte on the KL blocks, not the whole val split.")
    return "\n".join(lines)


def write_report(run_dir: Location) -> Location:
    """Write RUN_DIR/report.md and RUN_DIR/report/*.png from the run's outputs; returns the report's location."""
    layout = RunLayout.of(run_dir)
    if not (files.is_file(layout.config) or files.is_file(layout.metrics)):
        raise RunFileError(f"{run_dir}: not a run directory (no config.yaml or metrics.jsonl)")
    metrics = _read_metrics(layout.metrics)
    plots: dict[str, bytes] = {}
    name = str(layout.run_dir).rstrip("/").rsplit("/", 1)[-1]
    md = [f"# Report card: {name}", ""]
    md += ["## Training", ""]
    if metrics:
        tokens_per_step = _tokens_per_step(metrics)
        last = metrics[-1]
        val = [m for m in metrics if "val_loss" in m]
        md.append(f"{last['step']} steps" + (f", {last['step'] * tokens_per_step / 1e6:.2f}M tokens" if tokens_per_step else "")
                  + f"; final train loss {last.get('loss', float('nan')):.3f}"
                  + (f", validation loss {val[-1]['val_loss']:.3f} ({val[-1]['val_bpb']:.3f} bits per byte)" if val else "")
                  + (f"; precision {last['precision']}" if "precision" in last else "") + ".")
        plots.update(_training_plots(metrics, tokens_per_step))
        md += ["", f"![loss]({PLOTS}/loss.png)", ""]
        if "throughput.png" in plots:
            timed = [m["tokens_per_sec"] for m in metrics if "tokens_per_sec" in m]
            md += [f"Throughput: median {sorted(timed)[len(timed) // 2]:,.0f} tokens/s.", "",
                   f"![throughput]({PLOTS}/throughput.png)", ""]
    else:
        md += ["Not run yet (no metrics.jsonl).", ""]
    md += ["## Evaluation", ""]
    if files.is_file(layout.eval_report):
        table = files.read_text(layout.eval_report).split("\n", 2)[-1].strip()  # the stage's own table
        md += [table, ""]
    else:
        md += ["Not run yet.", ""]
    md += ["## Quantization", ""]
    if files.is_file(layout.quantize_report):
        report = files.read_json(layout.quantize_report, "quantization report")
        plots["quantization.png"] = _quantization_plot(report)
        md += [_quantization_table(report), "", f"![quantization]({PLOTS}/quantization.png)", ""]
    else:
        md += ["Not run yet.", ""]
    for file, data in plots.items():
        files.atomic_write(layout.report_plot(file), data)
    return files.atomic_write(layout.report, "\n".join(md))
