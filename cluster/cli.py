"""The `raygpt` command line: one entry point, a subcommand per stage.

    raygpt prepare  CONFIG [section.key=value ...]   corpus → tokenizer + shards in RUN_DIR/data
    raygpt train    CONFIG [section.key=value ...]   shards → checkpoints (Ray Train + DeepSpeed), resumes
    raygpt finetune CONFIG [section.key=value ...]   conversations → the base model fine-tuned (RUN_DIR/finetune)
    raygpt eval     CONFIG [section.key=value ...]   checkpoints → RUN_DIR/eval/{results.json,report.md}
    raygpt quantize CONFIG [section.key=value ...]   int8 / 4-bit / bitsandbytes checkpoints + report vs full precision
    raygpt sample   CONFIG [section.key=value ...]   the final checkpoint continues sample.prompt → RUN_DIR/sample.txt
    raygpt run      CONFIG [section.key=value ...]   the main job: prepare → train → [finetune →] eval → quantize → sample
    raygpt submit   --address http://HOST:8265 [--no-wait] -- SUBCOMMAND ARGS...   as a Ray job; exits with its status
    raygpt jobs     list|status|logs|stop [JOB_ID] --address http://HOST:8265
    raygpt generate CHECKPOINT --prompt TEXT [--max-new-tokens N --temperature T --top-k K --top-p P --seed S --compile]
    raygpt export   CHECKPOINT --out DIR             Hugging Face format (Llama or GPT-2)
    raygpt export   CHECKPOINT --format gguf --quant q8_0 --out F.gguf   llama.cpp / Ollama
    raygpt report   RUN_DIR                          RUN_DIR/report.md + plots (also at the end of `run`)
    raygpt import   HF_DIR --out CKPT                a Hugging Face Llama / GPT-2 checkpoint → raygpt (model.init_from)
    raygpt config   show CONFIG [overrides] | schema [SECTION]   the resolved recipe / every key's type, default, doc
    raygpt plan     CONFIG [overrides] [--gpus N --gpu h100 --tokens T --mfu F]   memory and time on paper
    raygpt serve    RUN_DIR|CHECKPOINT [--host H --port P --replicas N] [serve.key=value ...]   OpenAI-compatible API

Bad configs, paths and inputs exit with status 2 and one line on stderr naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from core.errors import StageFailed, UserError, one_line, root_cause, user_error
from core.files import open_append

# Each command imports what it needs when it runs: `raygpt --help`, `jobs` and `submit` never load torch,
# transformers or lm-eval (benchmarks/cli_startup.py).


LINE_LIMIT = 400
"""The longest error line printed; values inside it are already cut to about 100 characters (`core.errors.shown`)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raygpt", description="Build and train a GPT from scratch on Ray.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and DeepSpeed's output too (it always goes "
                        "to RUN_DIR/logs/console.log)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("prepare", "corpus → tokenizer + webdataset shards in RUN_DIR/data"),
        ("train", "shards → checkpoints with Ray Train + DeepSpeed (resumes from the newest checkpoint)"),
        ("finetune", "the finetune section: conversations → the base model trained on its assistant tokens"),
        ("eval", "bits per byte, perplexity and lm-evaluation-harness tasks of the checkpoints"),
        ("quantize", "post-training int8 / 4-bit quantization of the checkpoint, evaluated against full precision"),
        ("sample", "the final checkpoint continues sample.prompt → RUN_DIR/sample.txt"),
        ("run", "the main job: prepare → train → [finetune →] eval → quantize → sample"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", help="YAML recipe, e.g. configs/demo.yaml")
        sub.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides of the recipe")
    pln = commands.add_parser("plan", help="memory per GPU for each ZeRO stage, the micro-batch that fits, step time "
                              "and GPU-hours, on paper (starts nothing)")
    pln.add_argument("config", help="YAML recipe, e.g. configs/cloud_gpu.yaml")
    pln.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides of the recipe")
    pln.add_argument("--gpus", type=int, default=8, help="GPUs in the run (default 8)")
    pln.add_argument("--gpu", default="h100", help="h200, h100, h100-pcie, a100-80g, a100-40g, l40s, l4, a10g, v100, "
                     "t4 (default h100)")
    pln.add_argument("--tokens", type=float, help="tokens to train (default: train.max_steps × global batch × context)")
    pln.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization to assume (default 0.4)")
    srv = commands.add_parser("serve", help="the model behind an OpenAI-compatible API on Ray Serve (/v1/completions)")
    srv.add_argument("target", help="a run directory (its final checkpoint, or serve.checkpoint) or a checkpoint folder")
    srv.add_argument("overrides", nargs="*", metavar="serve.key=value", help="serve settings (raygpt config schema serve)")
    srv.add_argument("--host", help="listen address (default serve.host: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, help="listen port (default serve.port: 8000)")
    srv.add_argument("--replicas", type=int, help="a fixed number of replicas (sets serve.min_replicas and max_replicas)")
    rep = commands.add_parser("report", help="RUN_DIR/report.md + plots: loss, bits per byte, throughput, eval, quantization")
    rep.add_argument("run_dir", help="a run directory (local, s3:// or gs://)")
    imp = commands.add_parser("import", help="a Hugging Face Llama / GPT-2 folder (safetensors) → a raygpt checkpoint")
    imp.add_argument("hf_dir", help="a transformers model folder: config.json, model.safetensors, tokenizer.json")
    imp.add_argument("--out", required=True, help="the raygpt checkpoint folder to write (start training from it with "
                     "model.init_from)")
    imp.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    config = commands.add_parser("config", help="print a resolved recipe, or the reference of every config key")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="the recipe as the stages see it (${VAR} kept as written)")
    show.add_argument("config", help="YAML recipe, e.g. configs/demo.yaml")
    show.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides of the recipe")
    schema = config_commands.add_parser("schema", help="every key with its type, default and meaning (docs/config.md)")
    schema.add_argument("section", nargs="?", help="a section (train, data.clean, ...) or a key; default: all")
    gen = commands.add_parser("generate", help="stream a checkpoint's continuation of a prompt")
    gen.add_argument("checkpoint", help="folder with model.safetensors, config.json, tokenizer.json; or a run directory, "
                     "its checkpoint or a model folder on s3:// / gs:// (downloaded once into the local cache)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: a GPU when there is one")
    gen.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                     help="auto: bf16 on GPUs that have it (else fp16), fp32 on CPUs")
    gen.add_argument("--compile", action="store_true",
                     help="decode through torch.compile: the first call compiles (seconds), later steps run one graph")
    sub = commands.add_parser("submit", help="run a raygpt subcommand as a Ray job on a cluster, streaming its logs")
    sub.add_argument("--address", help="job server, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    sub.add_argument("--working-dir", default=".", help="shipped to the cluster as the job's working_dir")
    sub.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                     help="env var for the job; KEY alone forwards this shell's value (nothing else is forwarded)")
    sub.add_argument("--job-id", help="submission id (default: generated)")
    sub.add_argument("--no-wait", action="store_true", help="return after submitting")
    sub.add_argument("argv", nargs=argparse.REMAINDER, help="-- SUBCOMMAND ARGS, e.g. -- run configs/cloud_gpu.yaml")
    jobs = commands.add_parser("jobs", help="list Ray jobs, or show the status / logs of one, or stop it")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--address", help="job server, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    exp = commands.add_parser(
        "export", help="write a checkpoint in Hugging Face format (full precision, bitsandbytes, or compressed-tensors for int8/4-bit)"
    )
    exp.add_argument("checkpoint", help="a checkpoint folder, or a checkpoint URI (s3:// / gs://)")
    exp.add_argument("--format", choices=["hf", "gguf"], default="hf",
                     help="hf: a Hugging Face folder (transformers, vLLM); gguf: one file for llama.cpp / Ollama")
    exp.add_argument("--quant", help="gguf only: f32, f16 (default), q8_0, q4_0 or q4_k_m")
    exp.add_argument("--out", required=True, help="output folder (hf: new or empty; never the checkpoint) or .gguf file")
    exp.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raygpt")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def _failed(error: StageFailed, log: Path) -> int:
    """A stage that failed for a reason other than the user's input: the whole traceback to the run's log, one line
    to the console (what failed, in which stage, at which step, where the rest is). Exit status 1."""
    with open_append(log) as f:
        f.write("".join(traceback.format_exception(error)))
    cause = root_cause(error)
    print(f"raygpt: error: {error}: {type(cause).__name__}: {one_line(cause, 200)} (the whole traceback is in {log}; "
          "--verbose shows it)", file=sys.stderr)
    return 1


def _sampling(args: argparse.Namespace) -> Any:
    """`generate`'s options validated as the `sample` config section is (`model.config.SampleConfig`): `--top-k 0`,
    `--temperature nan` or `--max-new-tokens -5` are one line naming the option."""
    from pydantic import ValidationError

    from core.config import problem_line
    from model.config import SampleConfig

    values = {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "top_k": args.top_k, "top_p": args.top_p, **({} if args.seed is None else {"seed": args.seed})}
    try:
        return SampleConfig.model_validate(values)
    except ValidationError as e:
        raise UserError(problem_line(e, name=lambda loc: "--" + str(loc[0]).replace("_", "-"))) from None


def _env_vars(items: list[str]) -> dict[str, str]:
    """`--env KEY=VALUE` and `--env KEY` (this shell's value, kept off the command line) flags → the job's env vars;
    anything else is a one-line error. Only these reach the job: nothing of the local environment is sent otherwise."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise UserError(f"--env {item!r}: expected KEY=VALUE or KEY, with KEY made of letters, digits and '_'")
        if not sep and key not in os.environ:
            raise UserError(f"--env {key}: not set in this shell (give --env {key}=VALUE or export it)")
        env[key] = value if sep else os.environ[key]
    return env


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `key=value` overrides after an option (`serve RUN --port 8001 serve.max_batch=8`) are still overrides
        if getattr(args, "overrides", None) is None or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        if args.command == "generate":
            from model.sample import stream_text

            opts = _sampling(args)
            stream_text(args.checkpoint, opts.prompt, opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p,
                        args.seed, device=args.device, precision=args.precision, compile=args.compile)
        elif args.command == "export":
            from model.export import ExportError, export

            if args.format == "gguf":
                from model.export_gguf import export_gguf

                print(f"exported to {export_gguf(args.checkpoint, Path(args.out), args.quant or 'f16', args.force)}")
            elif args.quant:
                raise ExportError("--quant is for --format gguf; quantize for transformers with `raygpt quantize`")
            else:
                print(f"exported to {export(args.checkpoint, args.out, force=args.force)}")
        elif args.command == "report":
            from cluster.report import write_report

            print(f"report card: {write_report(args.run_dir)}")
        elif args.command == "import":
            from model.hf_import import import_hf

            print(f"imported to {import_hf(args.hf_dir, args.out, force=args.force)}")
        elif args.command == "config":
            from cluster import schema
            from cluster.config import config_to_yaml, load_config

            if args.config_command == "show":
                print(config_to_yaml(load_config(args.config, args.overrides)), end="")
            else:
                try:
                    print(schema.text(args.section), end="")
                except KeyError as e:
                    raise UserError(e.args[0]) from None
        elif args.command == "plan":
            from cluster.config import load_config
            from trainer.plan import plan

            if args.gpus < 1:
                raise UserError("--gpus must be at least 1")
            if args.tokens is not None and not (math.isfinite(args.tokens) and args.tokens > 0):
                raise UserError(f"--tokens must be a finite number above 0 (got {args.tokens})")
            if not (math.isfinite(args.mfu) and 0 < args.mfu <= 1):
                raise UserError(f"--mfu must be a fraction in (0, 1] (got {args.mfu})")
            cfg = load_config(args.config, [*args.overrides, f"cluster.num_workers={args.gpus}"])  # the run on --gpus
            label = cfg.model.preset if cfg.model.init_from is None else cfg.model.init_from
            print(plan(cfg.planned_model(), label, cfg.train, cfg.global_batch_size, args.gpus, args.gpu, args.tokens,
                       args.mfu))
        elif args.command == "serve":
            from cluster.console import quiet_console
            from cluster.ray_connect import ray_session
            from cluster.serve_launch import resolve_target, serve_forever

            flags = [f"serve.{k}={v}" for k, v in (("host", args.host), ("port", args.port)) if v is not None]
            if args.replicas is not None:
                flags += [f"serve.min_replicas={args.replicas}", f"serve.max_replicas={args.replicas}"]
            target = resolve_target(args.target, [*args.overrides, *flags])
            with quiet_console(target.log_file, verbose=args.verbose), ray_session():
                serve_forever(target)
        elif args.command == "submit":
            from cluster.jobs import submit

            argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            env = _env_vars(args.env)
            return submit(args.address, argv, args.working_dir, env, follow=not args.no_wait, job_id=args.job_id)
        elif args.command == "jobs":
            from cluster.jobs import jobs_command

            return jobs_command(args.action, args.address, args.job_id, args.follow)
        else:
            from cluster import pipeline
            from cluster.config import load_config
            from cluster.console import quiet_console
            from cluster.ray_connect import ray_session
            from cluster.run_lock import run_locks

            cfg = load_config(args.config, args.overrides)
            with run_locks(cfg.layout, f"raygpt {args.command} {args.config}"):  # one writer per run_dir and storage
                try:
                    with quiet_console(cfg.layout.console_log, verbose=args.verbose), ray_session():
                        if args.command == "run":
                            pipeline.run(cfg)
                        else:
                            pipeline.run_stage(cfg, args.command)
                except StageFailed as e:
                    if args.verbose:
                        raise
                    return _failed(e, cfg.layout.console_log)
    except Exception as e:
        if (user := user_error(e)) is None:
            raise
        print(f"raygpt: error: {one_line(user, LINE_LIMIT)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
