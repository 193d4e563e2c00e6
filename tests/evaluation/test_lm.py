"""The lm-eval adapter and the intrinsic metrics on a small checkpoint: loglikelihoods equal log-probs computed token by
token, rolling loglikelihood equals the bits-per-byte path, sliding windows score every token once, generation stops
where asked, the plain `lm_eval --model raygpt` CLI works, and an HF export scored by lm-eval's `hf` model agrees."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from evaluation.intrinsic import score_text, score_tokens, windows
from evaluation.lm import RaygptLM
from model.checkpoint import save_checkpoint
from model.export import export
from model.generate import generate_tokens
from tests.conftest import perturbed_model

WIKITEXT_YAML = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "wikitext.yaml"


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory, tokenizer_file: Path) -> RaygptLM:
    folder = save_checkpoint(perturbed_model("llama"), tmp_path_factory.mktemp("ckpt") / "checkpoint", tokenizer_file)
    return RaygptLM(str(folder), batch_size=3)


def _direct_logprob(lm: RaygptLM, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context), one forward pass per continuation token, no batching or padding; a context too
    long for the model loses its left end, once for the whole continuation (as lm-eval's hf model does)."""
    full = context + continuation
    start = max(0, len(full) - (lm.max_length + 1))
    total = 0.0
    for i, token in enumerate(continuation):
        ids = full[start : len(context) + i]
        logits, _ = lm.model(torch.tensor([ids]))
        total += F.log_softmax(logits[0, -1].double(), dim=-1)[token].item()
    return total


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_is_the_sum_of_token_logprobs(lm: RaygptLM) -> None:
    pairs = [("To be, or not to be", ", that is the question"), ("ROMEO:", " But soft!"), ("", "First Citizen:"),
             ("A" * 300, " long context is truncated on the left")]
    scores = lm.loglikelihood(_requests("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, scores):
        ctx = lm.tok_encode(context)
        whole = lm.tok_encode(context + continuation)
        ctx, cont = (ctx, whole[len(ctx) :]) if context else ([lm.eot_token_id], whole)
        assert logprob == pytest.approx(_direct_logprob(lm, ctx, cont), abs=1e-4)
        assert logprob < 0 and isinstance(greedy, bool)


def test_greedy_flag_matches_the_argmax(lm: RaygptLM) -> None:
    prompt = lm.tok_encode("KING HENRY:")
    greedy_next = lm.model(torch.tensor([prompt]))[0][0, -1].argmax().item()
    other = (greedy_next + 1) % lm.model.cfg.vocab_size
    [(_, is_greedy), (_, not_greedy)] = lm._loglikelihood_tokens([(None, prompt, [greedy_next]), (None, prompt, [other])])
    assert is_greedy and not not_greedy


@pytest.mark.parametrize(("n", "context", "stride"), [(1, 8, 8), (10, 4, 4), (37, 8, 3), (64, 64, 1), (100, 16, 16)])
def test_windows_score_every_target_once(n: int, context: int, stride: int) -> None:
    scored = []
    for begin, end, count in windows(n, context, stride):
        assert 0 < end - begin <= context and 0 < count <= end - begin
        scored += range(end - count + 1, end + 1)  # target indices
    assert scored == list(range(1, n + 1))


def test_sliding_windows_equal_token_by_token_scoring(lm: RaygptLM) -> None:
    ids = [lm.eot_token_id, *lm.tok_encode("Before we proceed any further, hear me speak. " * 6)][:150]
    context, stride = 64, 16
    nll, n = score_tokens(lm.model, ids, context, stride, batch_size=4)
    expected = 0.0
    for begin, end, count in windows(len(ids) - 1, context, stride):
        for t in range(end - count + 1, end + 1):  # target t sees tokens begin..t-1
            expected -= _direct_logprob(lm, ids[begin:t], [ids[t]])
    assert n == len(ids) - 1 and nll == pytest.approx(expected, rel=1e-5)


def test_rolling_loglikelihood_agrees_with_bits_per_byte(lm: RaygptLM, shared_data: Path) -> None:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:3000]
    [rolling] = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    score = score_text(lm.model, text, lm.tokenizer, lm.eot_token_id, lm.max_length, lm.max_length, batch_size=5)
    assert score.nll == pytest.approx(-rolling, rel=1e-5)
    assert score.metrics["bits_per_byte"] == pytest.approx(-rolling / math.log(2) / len(text.encode()), rel=1e-5)


@pytest.mark.kernels  # generation: CI reruns it with the ISA forced to AVX2
def test_generate_until_stops_at_the_stop_string(lm: RaygptLM) -> None:
    free = lm.generate_until(_requests("generate_until", [("ROMEO:", {"max_gen_toks": 20})]))[0]
    stop = next(c for c in free[3:] if c.isascii() and c.strip())  # a character the greedy continuation contains
    cut = lm.generate_until(_requests("generate_until", [("ROMEO:", {"until": [stop], "max_gen_toks": 20})]))[0]
    assert stop not in cut and free.startswith(cut) and len(cut) < len(free)
    # a prompt longer than the model's window keeps its right end and still leaves room to generate
    [long] = lm.generate_until(_requests("generate_until", [("ROMEO: " * 200, {"max_gen_toks": 500})]))
    assert long


@pytest.mark.kernels  # generation: CI reruns it with the ISA forced to AVX2
def test_generate_until_batched_gives_what_each_request_gives_alone(lm: RaygptLM) -> None:
    """lm-eval's generate_until decodes up to batch_size (3) requests together; the outputs are those of the
    sequential decoder, request by request (stop strings, end-of-text, budgets and a prompt past the window)."""
    args = [("ROMEO:", {"max_gen_toks": 20}), ("JULIET: O", {"until": ["e"], "max_gen_toks": 12}),
            ("First Citizen:\nBefore", {"until": ["\n\n", "o"], "max_gen_toks": 30}), ("A", {"max_gen_toks": 5}),
            ("KING " * 40, {"max_gen_toks": 40}), ("Q", {"until": "s", "max_gen_toks": 25})]
    batched = lm.generate_until(_requests("generate_until", args))
    for (context, kwargs), got in zip(args, batched):
        budget = max(lm.max_length - kwargs["max_gen_toks"], lm.max_length // 2)
        prompt = torch.tensor([lm.tok_encode(context)[-budget:]])
        until = [kwargs["until"]] if isinstance(kwargs.get("until"), str) else kwargs.get("until", [])
        ids: list[int] = []
        for token in generate_tokens(lm.model, prompt, min(kwargs["max_gen_toks"], lm.max_length - prompt.shape[1])):
            if int(token) == lm.eot_token_id:
                break
            ids.append(int(token))
            if until and any(stop in lm.tok_decode(ids[-64:]) for stop in until):
                break
        alone = lm.tok_decode(ids)
        for stop in until:
            alone = alone.split(stop)[0]
        assert got == alone
    assert sum(bool(text) for text in batched) >= 4


def _local_wikitext_task(folder: Path, shared_data: Path, name: str) -> Path:
    """lm-eval's own wikitext task on the raw local file, for the CLI (which takes task names, not dicts)."""
    from evaluation.tasks import wikitext_articles

    data = wikitext_articles(shared_data / "wikitext-2" / "valid.txt", folder / "wikitext.jsonl")
    (folder / f"{name}.yaml").write_text(
        f"include: {WIKITEXT_YAML}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\ntest_split: null\ntraining_split: null\n"
    )
    return folder


def test_plain_lm_eval_cli_runs_the_raygpt_model(lm: RaygptLM, shared_data: Path, tmp_path: Path) -> None:
    tasks = _local_wikitext_task(tmp_path, shared_data, "wikitext_local")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "raygpt", "--model_args",
               f"checkpoint={lm.checkpoint}", "--batch_size", "4", "--tasks", "wikitext_local", "--include_path", str(tasks),
               "--limit", "2", "--output_path", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [result_file] = list(out.rglob("results_*.json"))
    metrics = json.loads(result_file.read_text())["results"]["wikitext_local"]
    assert metrics["bits_per_byte,none"] > 0 and math.isfinite(metrics["word_perplexity,none"])


def test_hf_export_scored_by_lm_eval_hf_model_agrees(lm: RaygptLM, shared_data: Path, tmp_path: Path) -> None:
    hf_dir = export(lm.checkpoint, tmp_path / "hf")
    task = {**_load(WIKITEXT_YAML), "dataset_path": "json", "dataset_name": None, "test_split": None, "training_split": None,
            "dataset_kwargs": {"data_files": {"validation": str(_local_wikitext_task(tmp_path, shared_data, "w") / "wikitext.jsonl")}}}
    ours = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=3, bootstrap_iters=0, log_samples=False)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=[task],
                                     limit=3, bootstrap_iters=0, log_samples=False, device="cpu", batch_size=3)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["wikitext"][metric] == pytest.approx(theirs["results"]["wikitext"][metric], rel=1e-4)
    # request level: plain loglikelihoods of gsm8k question → answer pairs
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=4)
    problems = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:6]]
    requests = _requests("loglikelihood", [(f"Question: {p['question']}\nAnswer:", " " + p["answer"][:40]) for p in problems])
    for (a, greedy_a), (b, greedy_b) in zip(lm.loglikelihood(requests), hf.loglikelihood(requests)):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def _load(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=True)



def test_mmlu_offline_picks_the_same_answers_as_lm_evals_hf_backend(lm: RaygptLM, shared_data: Path,
                                                                     tmp_path: Path) -> None:
    """MMLU from ../shared/data/mmlu through lm-eval's own mmlu tasks, 5-shot from the dev split: our adapter and
    lm-eval's `hf` model on the export choose the same answer for every question."""
    from evaluation.config import EvalConfig
    from evaluation.run import built
    from evaluation.tasks import resolve

    mmlu = {"test": str(shared_data / "mmlu" / "mmlu_test.jsonl"), "dev": str(shared_data / "mmlu" / "mmlu_dev.jsonl")}
    cfg = EvalConfig(tasks=["mmlu_abstract_algebra", "mmlu_anatomy"], fewshot={"mmlu_abstract_algebra": 5,
                     "mmlu_anatomy": 5}, local_data={"mmlu_abstract_algebra": mmlu, "mmlu_anatomy": mmlu})
    specs, _, manager, _ = resolve(cfg, tmp_path)
    hf_dir = export(lm.checkpoint, tmp_path / "hf")
    runs = [lm_eval.simple_evaluate(model=model, tasks=[built(s, manager) for s in specs], task_manager=manager, limit=8,
                                    bootstrap_iters=0, log_samples=True, **extra)
            for model, extra in ((lm, {}), ("hf", {"model_args": f"pretrained={hf_dir},dtype=float32", "device": "cpu",
                                                    "batch_size": 4}))]
    for task in ("mmlu_abstract_algebra", "mmlu_anatomy"):
        ours, theirs = ([max(range(4), key=lambda i: s["resps"][i][0][0]) for s in r["samples"][task]] for r in runs)
        assert len(ours) == 8 and ours == theirs
        assert runs[0]["n-shot"][task] == 5 and runs[0]["samples"][task][0]["doc"]["subject"] == task[len("mmlu_"):]


def test_the_mmlu_group_runs_offline_with_each_subject_on_its_own_rows(shared_data: Path, tmp_path: Path) -> None:
    from evaluation.config import EvalConfig
    from evaluation.tasks import resolve

    mmlu = {"test": str(shared_data / "mmlu" / "mmlu_test.jsonl"), "dev": str(shared_data / "mmlu" / "mmlu_dev.jsonl")}
    [group], *_ = resolve(EvalConfig(tasks=["mmlu"], local_data={"mmlu": mmlu}, fewshot={"mmlu": 5}), tmp_path)
    assert group["group"] == "mmlu" and len(group["task"]) == 57
    assert group["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]  # lm-eval's own aggregate
    sizes = {}
    for member in group["task"]:
        files = member["dataset_kwargs"]["data_files"]
        rows = [json.loads(line) for line in Path(files["test"]).read_text().split("\n") if line]
        dev = [line for line in Path(files["dev"]).read_text().split("\n") if line]
        assert {r["subject"] for r in rows} == {member["task"].removeprefix("mmlu_")} and len(dev) == 5
        assert member["num_fewshot"] == 5 and member["fewshot_split"] == "dev" and member["test_split"] == "test"
        sizes[member["task"]] = len(rows)
    assert sum(sizes.values()) == 14042 and sizes["mmlu_abstract_algebra"] == 100 and sizes["mmlu_anatomy"] == 135


def test_apply_chat_template_formats_lm_evals_requests_with_the_checkpoints_template(
    lm: RaygptLM, shared_data: Path, tmp_path: Path
) -> None:
    """`lm_eval --model raygpt --apply_chat_template` (simple_evaluate's option of that name): each generation request
    is the conversation as the checkpoint's ChatML formats it, ending at the assistant's turn; a prefilled reply ends
    right after the prefill, as transformers' continue_final_message does."""
    from core.chat import CHATML, render
    from tests.conftest import short_lm_eval_tasks

    _, generate = short_lm_eval_tasks(shared_data, tmp_path)
    run = lm_eval.simple_evaluate(model=lm, tasks=[generate], apply_chat_template=True, limit=2, bootstrap_iters=0,
                                  log_samples=True)
    for sample in run["samples"]["lines_gen"]:
        user = {"role": "user", "content": sample["doc"]["prompt"]}
        assert sample["arguments"][0][0] == render(CHATML, [user], add_generation_prompt=True)
    prefilled = lm.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well,"}],
                                       add_generation_prompt=False)
    assert prefilled == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nWell,"
    assert lm.chat_template(True) == CHATML and lm.chat_template(False) is None
