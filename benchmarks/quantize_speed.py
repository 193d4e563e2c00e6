"""Quantized decode speed and resident memory against fp32, each checkpoint in its own process, one run.

    .venv/bin/python benchmarks/quantize_speed.py [--presets gpt2-124m llama-1b] [--tokens 32] [--batches 1 8]
        [--agreement-run runs/demo]        # greedy agreement with fp32 on a trained run's quantized checkpoints
        [--keep /tmp/qs]                   # keep the checkpoints, and reuse them on the next run
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python ...  # AVX2 figures

For each preset a randomly initialised model (speed and memory do not depend on the weights) is saved in fp32 and
quantized with int8, int4-rtn, gptq and awq (group 128; GPTQ/AWQ calibrated on random tokens). Then each checkpoint
is measured in a fresh process: resident memory after imports (the baseline), after `load_checkpoint` (model memory =
the difference, after `malloc_trim` so that glibc's freed-but-kept pages are not counted for either side), after
decoding, and greedy decode tokens/s at each batch size (16-token prompt, `--tokens` new tokens, after a warm-up).
Targets (issue 32): model memory ≤ 0.55× fp32 (int8) and ≤ 0.35× (4-bit); batch-1 decode ≥ 1.3× (int8) and ≥ 1.5×
(4-bit) fp32. `--agreement-run` adds, per method, the share of greedy tokens equal to fp32's on that run's
checkpoint and its `quantized/<method>` checkpoints (4 val prompts × 32 tokens).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = ["fp32", "int8", "int4-rtn", "gptq", "awq"]
TARGETS = {"int8": (0.55, 1.3), "int4-rtn": (0.35, 1.5), "gptq": (0.35, 1.5), "awq": (0.35, 1.5)}
"""Method → (largest model memory vs fp32, smallest batch-1 decode speed vs fp32)."""


def synthetic_tokenizer(vocab_size: int, path: Path) -> Path:
    """A byte-level BPE tokenizer with exactly `vocab_size` tokens (the 256 bytes, filler tokens, end-of-text): what
    a checkpoint needs to load; the benchmark feeds token ids directly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    while len(vocab) < vocab_size - 1:
        vocab[f"<filler{len(vocab)}>"] = len(vocab)
    vocab["<|endoftext|>"] = vocab_size - 1
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path))
    return path


def make(preset: str, folder: Path) -> None:
    """Child: the fp32 checkpoint and its quantized versions under folder/<method>."""
    import torch

    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.gpt import GPT, ModelConfig
    from model.quantize import quantize_model

    torch.manual_seed(0)
    model = GPT(ModelConfig.preset(preset)).eval()
    tokenizer = synthetic_tokenizer(model.cfg.vocab_size, folder / "synthetic-bpe.json")
    save_checkpoint(model, folder / "fp32", tokenizer)
    del model
    calibration = torch.randint(0, 256, (16, 128), generator=torch.Generator().manual_seed(1))
    for method in METHODS[1:]:
        started = time.perf_counter()
        model = load_checkpoint(folder / "fp32").model
        record = quantize_model(model, method, group_size=128, calibration=calibration)
        save_checkpoint(model, folder / method, tokenizer, extra={"quantization": record})
        print(f"  {preset} {method}: quantized in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        del model


def measure(folder: Path, tokens: int, batches: list[int]) -> dict[str, Any]:
    """Child: memory and greedy decode speed of one checkpoint, as JSON."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.generate import generate_tokens
    from evaluation.quantize import resident_bytes  # what loading a quantized checkpoint imports is in the baseline:
    from model.quantize_kernels import QuantLinear  # it is code, not the model

    baseline = resident_bytes()
    model = load_checkpoint(folder).model
    loaded = resident_bytes()
    result: dict[str, Any] = {"model_bytes": loaded - baseline, "speed": {}}
    with torch.no_grad():
        for batch in batches:
            prompt = torch.randint(0, 256, (batch, 16), generator=torch.Generator().manual_seed(batch))
            for _ in generate_tokens(model, prompt, 4):  # warm-up: kernels chosen, weights packed
                pass
            started = time.perf_counter()
            for _ in generate_tokens(model, prompt, tokens):
                pass
            result["speed"][batch] = batch * tokens / (time.perf_counter() - started)
    result["after_decode_bytes"] = resident_bytes() - baseline
    result["kernels"] = sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear) and m.kernel})
    return result


def agreement(run_dir: Path, new_tokens: int = 32) -> dict[str, float]:
    """Child: per quantized method of a trained run, the share of greedy tokens equal to fp32's (4 val prompts)."""
    import torch

    from core.layout import RunLayout
    from data_pipeline.manifest import read_manifest
    from model.checkpoint import load_checkpoint
    from model.generate import generate

    layout = RunLayout.of(run_dir)
    data = layout.data.root
    blocks = read_manifest(data).blocks(data, "val")
    prompts = torch.stack([torch.from_numpy(b[:32].astype("int64")) for _, b in zip(range(4), blocks)])
    with torch.no_grad():
        want = generate(load_checkpoint(layout.checkpoint).model, prompts, new_tokens)[:, 32:]
        shares = {}
        for method in METHODS[1:]:
            folder = Path(layout.quantized(method))
            if (folder / "config.json").is_file():
                got = generate(load_checkpoint(folder).model, prompts, new_tokens)[:, 32:]
                shares[method] = (got == want).float().mean().item()
    return shares


def child(args: list[str]) -> Any:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    sys.stderr.write(done.stderr)
    return json.loads(done.stdout.splitlines()[-1]) if done.stdout.strip() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["gpt2-124m", "llama-1b"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--agreement-run", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the checkpoints in this folder and reuse them when run again (e.g. for a forced-ISA run)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "make":
            return make(rest[0], Path(rest[1]))
        if kind == "measure":
            return print(json.dumps(measure(Path(rest[0]), args.tokens, args.batches)))
        return print(json.dumps(agreement(Path(rest[0]))))
    from model.flops import machine_header

    print(machine_header())
    print(f"greedy decode: 16-token prompt + {args.tokens} new tokens; model memory = RSS after load − RSS before, "
          "after malloc_trim; each checkpoint in its own process")
    shares = child(["--child", "agreement", str(args.agreement_run)]) if args.agreement_run else {}
    batches = [str(b) for b in args.batches]
    header = ["preset", "method", "model MiB", "× fp32", "after decode MiB"]
    header += [f"tok/s b{b}" for b in batches] + [f"× fp32 b{b}" for b in batches] + ["kernels", "greedy = fp32"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    misses = []
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.keep / preset if args.keep else Path(tmp)
            if not (work / METHODS[-1] / "config.json").is_file():
                work.mkdir(parents=True, exist_ok=True)
                child(["--child", "make", preset, str(work)])
            rows = {m: child(["--child", "measure", str(work / m), "--tokens", str(args.tokens),
                              "--batches", *batches]) for m in METHODS}
        base = rows["fp32"]
        for method, row in rows.items():
            memory = row["model_bytes"] / base["model_bytes"]
            speed = {b: row["speed"][b] / base["speed"][b] for b in batches}
            cells = [preset, method, f"{row['model_bytes'] / 2**20:.0f}", f"{memory:.2f}",
                     f"{row['after_decode_bytes'] / 2**20:.0f}"]
            cells += [f"{row['speed'][b]:.1f}" for b in batches] + [f"{speed[b]:.2f}" for b in batches]
            cells += [", ".join(row["kernels"]) or "-", f"{shares[method]:.0%}" if method in shares else "-"]
            print("| " + " | ".join(cells) + " |", flush=True)
            if method in TARGETS:
                most, least = TARGETS[method]
                if memory > most or speed.get("1", least) < least:
                    misses.append(f"{preset} {method}: memory {memory:.2f}× (≤ {most}), b1 {speed.get('1', 0):.2f}× "
                                  f"(≥ {least})")
    print("targets: " + ("all met" if not misses else "missed — " + "; ".join(misses)))


if __name__ == "__main__":
    main()
