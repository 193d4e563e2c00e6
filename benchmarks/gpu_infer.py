"""Decoding on a GPU: greedy tokens/s of one checkpoint in fp32, fp16, bf16 and its quantized versions (bitsandbytes
int8 / NF4, raygpt's int8, 4-bit RTN and GPTQ, with bf16 activations as `load_for_inference` runs them on a GPU),
batch 1 and batch 16 through the continuous-batching engine, in one run; each row also says how many of the 64 greedy
tokens match fp32's, which kernel raygpt's quantized layers chose (`QuantLinear.kernel`) and, for GPTQ, how long its
calibration took on the device (64 random sequences of 256 tokens: a speed figure, not a quality one).

    .venv/bin/python benchmarks/gpu_infer.py [--checkpoint runs/x/checkpoint] [--preset gpt2-124m] [--tokens 128]

Without --checkpoint, a randomly initialised model of --preset (vocab 50,304) is saved to a temp folder with a byte
tokenizer, which is enough for speed (not for quality). A method whose kernels do not run on this GPU is reported as
failing with its one-line reason, not skipped silently. On a machine without a CUDA GPU it exits with status 2 and
one line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint")
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda", help="cpu: the same code path on a CPU (a smoke test, no figures)")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_infer.py: no CUDA GPU on this machine; nothing measured", file=sys.stderr)
        sys.exit(2)

    from tokenizers import Tokenizer, models, pre_tokenizers

    from model.batching import Engine, Request
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.gpt import GPT, ModelConfig
    from model.quantize import quantize_model, set_activation_dtype
    from model.quantize_kernels import QuantLinear

    tmp = tempfile.mkdtemp()
    checkpoint = args.checkpoint
    if checkpoint is None:
        cfg = ModelConfig.preset(args.preset, vocab_size=50304)
        vocab = {"<|endoftext|>": 0, **{f"<{i}>": i for i in range(1, 50304)}}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.save(f"{tmp}/tokenizer.json")
        checkpoint = str(save_checkpoint(GPT(cfg), Path(tmp) / "random", f"{tmp}/tokenizer.json"))

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def decode(model: torch.nn.Module, batch: int) -> tuple[float, list[int]]:
        engine = Engine(model, max_batch=batch, eos_id=None)
        prompts = [[(7 * i + j) % 50000 + 1 for j in range(32)] for i in range(batch)]
        for prompt in prompts:
            engine.add(Request(prompt, args.tokens))
        first: list[int] = []
        sync()
        started = time.perf_counter()
        while not engine.idle:
            for event in engine.step():
                if event.id == 0 and event.token is not None:
                    first.append(event.token)
        sync()
        return batch * args.tokens / (time.perf_counter() - started), first[:64]

    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke test: not a GPU figure)"
    print(f"device: {where}; torch {torch.__version__}; checkpoint {checkpoint}; "
          f"{args.tokens} new tokens after a 32-token prompt, greedy")
    print("| weights | batch 1 tokens/s | batch 16 tokens/s | vs fp32 (batch 1) | greedy tokens equal to fp32 "
          "| kernel | calibration s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    reference, base = None, None
    variants = ["fp32", "fp16", "bf16", "bnb-int8", "bnb-nf4", "int8", "int4-rtn", "gptq"]
    activations = torch.bfloat16 if args.device == "cuda" else torch.float32  # as load_for_inference runs them
    for variant in variants:
        calibration_s = ""
        try:
            loaded = load_checkpoint(checkpoint)
            model = loaded.model
            if variant in ("fp16", "bf16"):
                model = model.to({"fp16": torch.float16, "bf16": torch.bfloat16}[variant])
            elif variant.startswith("bnb"):
                quantize_model(model, variant, group_size=128)
            elif variant != "fp32":
                model = model.to(args.device)  # GPTQ calibrates where the model is
                calibration = None
                if variant == "gptq":
                    shape = (64, min(256, model.cfg.block_size))
                    calibration = torch.randint(1, model.cfg.vocab_size, shape, generator=torch.Generator().manual_seed(0))
                    calibration = calibration.to(args.device)
                sync()
                started = time.perf_counter()
                quantize_model(model, variant, group_size=128, calibration=calibration)
                sync()
                calibration_s = f"{time.perf_counter() - started:.1f}" if variant == "gptq" else ""
                set_activation_dtype(model, activations)
            model = model.to(args.device).eval()
            decode(model, 1)  # warm up (kernels, allocator)
            one, tokens = decode(model, 1)
            sixteen, _ = decode(model, 16)
        except Exception as e:  # a method whose kernels do not run here: say why, keep going
            print(f"| {variant} | fails: {type(e).__name__}: {str(e).splitlines()[0][:100]} | | | | | |")
            continue
        reference, base = reference or tokens, base or one
        same = sum(a == b for a, b in zip(tokens, reference))
        kernels = ", ".join(sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear) and m.kernel}))
        print(f"| {variant} | {one:,.0f} | {sixteen:,.0f} | {one / base:.2f} | {same}/{len(reference)} "
              f"| {kernels or '-'} | {calibration_s} |")


if __name__ == "__main__":
    main()
