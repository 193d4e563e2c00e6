"""raygpt checkpoints as an lm-evaluation-harness model, registered as "raygpt".

    lm_eval run --model raygpt --model_args checkpoint=runs/demo/checkpoint --batch_size 16 --tasks wikitext --limit 5

The plain `lm_eval` CLI finds "raygpt" through `evaluation/lm_eval_plugin.py` (installed by `make`); `raygpt eval`
uses the class directly. Semantics follow lm-eval's `hf` backend so that scores agree with it on an exported model:
contexts are encoded together with their continuation (trailing spaces moved to the continuation), left-truncated to
the context length, empty contexts and rolling windows start from the end-of-text token, and generation stops at the
first `until` string or at end-of-text.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  # the built-in models register first, so registering ours cannot hide them
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import Collator

from core.chat import ChatError, check_messages, render, stop_ids
from core.progress import Progress
from model.batching import Engine, Request
from model.checkpoint import load_for_inference

PRECISIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""lm-eval's dtype names → ours; "auto" is `model.precision.inference_precision`'s rule."""


class RaygptLM(TemplateLM):
    """An lm-eval `LM` over a raygpt checkpoint folder (model.safetensors + config.json + tokenizer.json)."""

    def __init__(
        self,
        checkpoint: str,
        batch_size: int | str | None = 16,
        device: str | None = "auto",
        dtype: str = "fp32",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = 1234,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        # lm_eval's CLI asks for cuda by default: a GPU when there is one, else the CPU (model.precision)
        use_gpu = None if device in (None, "auto") or str(device).startswith("cuda") else False
        loaded, choice = load_for_inference(checkpoint, use_gpu, PRECISIONS.get(dtype, dtype))
        cfg = loaded.config
        device = str(next(loaded.model.parameters()).device)
        self.dtype = choice.precision
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.template = loaded.chat_template
        self._eot = loaded.eot_id
        self._stops = stop_ids(self.tokenizer, self._eot, self.template)  # a chat reply also ends at its turn's end
        self.checkpoint = str(checkpoint)
        self.step = loaded.step
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if batch_size not in (None, "auto") else 16
        self.max_length = min(max_length or cfg.block_size, cfg.block_size)
        self.max_gen_toks = max_gen_toks
        self.seed = seed

    # ---------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    # ---------------------------------------------------------------- chat (`--apply_chat_template`)
    @property
    def tokenizer_name(self) -> str:
        """What lm-eval keys its request cache by: the checkpoint (its tokenizer and chat template)."""
        return self.checkpoint

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's few-shot conversation as the checkpoint's chat template formats it (`core.chat`), as the hf
        backend does with the tokenizer's: ending at the assistant's turn, or, when lm-eval prefills the reply,
        right after the prefill."""
        if self.template is None:
            raise ChatError(f"{self.checkpoint}: no chat template (its tokenizer has no <|im_start|>/<|im_end|>); "
                            "run without --apply_chat_template")
        messages = check_messages(chat_history, allow_empty_last=True)
        return render(self.template, messages, add_generation_prompt, continue_final_message=not add_generation_prompt)

    # ---------------------------------------------------------------- scoring
    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding yields the continuation, per request.
        Sorted longest first so each batch's first request sets its padded width."""
        collator = Collator(requests, sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])))
        results: list[tuple[float, bool]] = []
        progress = Progress("eval", "loglikelihood", len(requests), unit="requests", enabled=not disable_tqdm)
        for batch in collator.get_batched(n=self.batch_size):
            if any(len(cont) > self.max_length for _, _, cont in batch):
                raise ValueError(f"a continuation is longer than the model's context of {self.max_length} tokens")
            # the last max_length tokens of context+continuation, minus the final one, are the inputs
            inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in batch]
            width = max(len(x) for x in inputs)
            padded = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T), right-padded
            for row, x in enumerate(inputs):
                padded[row, : len(x)] = torch.tensor(x)
            logits, _ = self.model(padded.to(self.device))  # (B, T, V)
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for row, ((key, _, cont), x) in enumerate(zip(batch, inputs)):
                positions = logprobs[row, len(x) - len(cont) : len(x)]  # (len(cont), V): predicts cont
                target = torch.tensor(cont, device=self.device)
                answer = (positions.gather(-1, target[:, None]).sum().item(), bool((positions.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                progress.update(1)
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows of max_length targets, the first one after end-of-text."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, ctx, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if asked) continuations, cut at the first stop string. Up to batch_size requests
        decode together with continuous batching (model/batching.py); each gives what it gives decoded alone."""
        engine = Engine(self.model, max_batch=self.batch_size, eos_id=self.eot_token_id)
        progress = Progress("eval", "generate_until", len(requests), unit="requests", enabled=not disable_tqdm)
        outputs: list[str | None] = [None] * len(requests)
        running: dict[int, tuple[int, list[str], list[int]]] = {}  # engine id → (request index, stop strings, ids)
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 0.0)) > 0
            # keep at least half the window for context when a task asks for more new tokens than fit
            budget = max(self.max_length - max_gen, self.max_length // 2)
            prompt = (self.tok_encode(context) or [self.eot_token_id])[-budget:]
            new_tokens = min(max_gen, self.max_length - len(prompt))
            if new_tokens < 1:
                outputs[index] = self._finish(req, "", until, progress)
                continue
            temperature = float(kwargs.get("temperature", 0.0)) if sample else 0.0
            request = Request(prompt, new_tokens, temperature, seed=self.seed, stop_ids=tuple(self._stops))
            running[engine.add(request)] = (index, until, [])
        while not engine.idle:
            for event in engine.step():
                if event.id not in running:  # cut at a stop string already; this is its "cancelled"
                    continue
                index, until, ids = running[event.id]
                done = event.finish is not None
                if event.token is not None and event.token not in self._stops:
                    ids.append(event.token)
                    if until and any(stop in self.tok_decode(ids[-64:]) for stop in until) and not done:
                        engine.cancel(event.id)
                        done = True
                if done:
                    del running[event.id]
                    outputs[index] = self._finish(requests[index], self.tok_decode(ids), until, progress)
        return [text or "" for text in outputs]

    def _finish(self, req: Instance, text: str, until: list[str], progress: Progress) -> str:
        for stop in until:
            text = text.split(stop)[0]
        self.cache_hook.add_partial("generate_until", req.args, text)
        progress.update(1)
        return text


if "raygpt" not in model_registry:
    model_registry.register("raygpt", target=RaygptLM)
