"""Loglikelihood requests/s of our lm-eval adapter vs lm-eval's `hf` backend on the exported model, same run.

    .venv/bin/python benchmarks/eval_throughput.py [--checkpoint runs/demo/checkpoint] [--limit 200] [--repeats 3]

Both sides get the same checkpoint (ours directly, `hf` through `raygpt export`), fp32, batch size 16, this machine's
threads, and the same requests: (a) gsm8k test problems as loglikelihood requests (context "Question: ...\\nAnswer:",
continuation the first 300 characters of the answer), (b) lm-eval's own wikitext task on the local wikitext-2 file (loglikelihood_rolling) through
`simple_evaluate`. The two are timed alternately after a warm-up; the medians and their ratio are printed. The default
checkpoint is the one `make demo` trains.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from evaluation.lm import RaygptLM  # noqa: E402
from evaluation.tasks import wikitext_articles  # noqa: E402
from model.export import export  # noqa: E402
from model.flops import machine_header  # noqa: E402

SHARED = Path(os.environ.get("RAYGPT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))  # own path: the shared test data


def _median_pair(ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> tuple[float, float]:
    ours(), theirs()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((ours, times[0]), (theirs, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/checkpoint")
    parser.add_argument("--limit", type=int, default=200, help="gsm8k requests")
    parser.add_argument("--wikitext-docs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine_header())

    tmp = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    ours = RaygptLM(args.checkpoint, batch_size=16, device="cpu")
    theirs = HFLM(pretrained=str(export(args.checkpoint, tmp / "exported")), dtype="float32", device="cpu", batch_size=16)
    print(f"checkpoint {args.checkpoint}: {ours.model.num_params():,} params, context {ours.max_length}")

    problems = [json.loads(line) for line in (SHARED / "gsm8k" / "test.jsonl").read_text().splitlines()[: args.limit]]
    requests = [
        Instance("loglikelihood", doc={}, arguments=(f"Question: {p['question']}\nAnswer:", " " + p["answer"][:300]), idx=i)
        for i, p in enumerate(problems)
    ]
    a, b = ours.loglikelihood(requests, disable_tqdm=True), theirs.loglikelihood(requests, disable_tqdm=True)
    drift = max(abs(x[0] - y[0]) for x, y in zip(a, b))
    t_ours, t_theirs = _median_pair(
        lambda: ours.loglikelihood(requests, disable_tqdm=True), lambda: theirs.loglikelihood(requests, disable_tqdm=True),
        args.repeats,
    )
    print(f"(a) gsm8k loglikelihood, {len(requests)} requests (max |Δ logprob| {drift:.1e}):")
    print(f"    ours {len(requests) / t_ours:.1f} req/s, hf {len(requests) / t_theirs:.1f} req/s, "
          f"ratio {t_theirs / t_ours:.2f}x")

    data = wikitext_articles(SHARED / "wikitext-2" / "valid.txt", tmp / "wikitext.jsonl")
    task = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "wikitext.yaml", resolve_func=True)
    task |= {"dataset_path": "json", "dataset_name": None, "test_split": None, "training_split": None,
             "dataset_kwargs": {"data_files": {"validation": str(data)}}}

    def run(model: object) -> dict:
        return lm_eval.simple_evaluate(model=model, tasks=[dict(task)], limit=args.wikitext_docs, bootstrap_iters=0,
                                       log_samples=False, verbosity="ERROR")["results"]["wikitext"]

    r_ours, r_theirs = run(ours), run(theirs)
    t_ours, t_theirs = _median_pair(lambda: run(ours), lambda: run(theirs), args.repeats)
    print(f"(b) wikitext task (loglikelihood_rolling), {args.wikitext_docs} articles: bits/byte ours "
          f"{r_ours['bits_per_byte,none']:.6f}, hf {r_theirs['bits_per_byte,none']:.6f}")
    print(f"    ours {args.wikitext_docs / t_ours:.2f} docs/s, hf {args.wikitext_docs / t_theirs:.2f} docs/s, "
          f"ratio {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
    main()
