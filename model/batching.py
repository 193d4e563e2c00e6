"""Continuous batching: many sequences decode together, each in its own row of one KV cache; a request joins the
batch when a row is free and leaves it the step it finishes, so short and long requests share the model's steps.

    engine = Engine(model, max_batch=16, eos_id=eot)
    ids = [engine.add(Request(prompt, max_new_tokens=64)) for prompt in prompts]   # any thread
    while not engine.idle:
        for event in engine.step(): ...                                          # one thread drives it

Each step decodes one token for every running sequence in one forward pass (per-row positions: row b attends to its
own prefix only, `GPT.forward` with a tensor `start`), then prefills the sequences that joined (one forward each,
into their rows). A finished row is refilled by moving the last row's cache into it, so the running rows are always
0..n-1. Sampling draws from each request's own generator, so a seeded request gives the same tokens whatever else
is in the batch, and greedy decoding gives the same tokens as decoding the request alone.
Used by `raygpt serve` (cluster/serve.py) and lm-eval's `generate_until` (evaluation/lm.py).
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass

import torch

from model.generate import filter_logits
from model.gpt import GPT, KVCache


@dataclass(frozen=True)
class Request:
    """What to generate: `prompt` token ids, then at most `max_new_tokens` (fewer where the context ends)."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    """0: greedy"""
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    """seeds this request's own sampling generator (unseeded: from torch's global one)"""
    stop_ids: tuple[int, ...] = ()
    """ids that end it besides the engine's eos_id (a chat turn's end); finish "stop", the id is the event's token"""
    logprobs: int | None = None
    """with a number k, each event carries its token's log-probability and the k most likely tokens'"""


@dataclass(frozen=True)
class Event:
    """One step of one request: its new `token`, and `finish` once it is done ("stop": the end-of-text token, which
    is then `token`; "length": `max_new_tokens` or the context's end; "cancelled": `Engine.cancel`, token None;
    "error": `Engine.drop_all` after a failed step)."""

    id: int
    token: int | None
    finish: str | None = None
    logprob: float | None = None
    """log p(token) under the model's distribution (before temperature and top-p), with `Request.logprobs`"""
    top: tuple[tuple[int, float], ...] = ()
    """the `Request.logprobs` most likely (id, log-probability) pairs there, most likely first"""


@dataclass
class _Sequence:
    id: int
    request: Request
    limit: int  # new tokens it may make: max_new_tokens, or fewer where the context ends
    generator: torch.Generator | None
    position: int = 0  # where its last token goes in the cache (the prompt fills 0..len(prompt)-1)
    last: int = -1  # its newest token, not yet in the cache
    made: int = 0
    finished: str | None = None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
    """Per row of logits (N, V): log p(tokens[i]) and the k most likely (id, log p), in fp32 (what the completions
    API's `logprobs` reports; also the prompt's, for `echo`)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen = logp.gather(1, tokens[:, None].to(logp.device))[:, 0].tolist()
    values, ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())
    return [(c, tuple(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]


class Engine:
    """Continuous batching over `max_batch` rows of one KV cache (`GPT` in eval mode; any device and dtype)."""

    def __init__(self, model: GPT, max_batch: int, eos_id: int | None) -> None:
        self.model, self.cfg, self.max_batch, self.eos_id = model, model.cfg, max_batch, eos_id
        first = next(model.parameters())  # as generate_tokens: quantized models keep float norms and biases
        self.device = first.device
        self.cache = KVCache(self.cfg, max_batch, self.cfg.block_size, first.device, first.dtype)
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.running: list[_Sequence] = []  # index = cache row
        self.cancelled: set[int] = set()
        self.finished: collections.Counter[str] = collections.Counter()
        """requests finished so far, by reason (stop, length, cancelled)"""
        self.lock = threading.Lock()
        self.ids = itertools.count()

    def validate(self, request: Request) -> None:
        """A ValueError naming what is wrong with a request this model cannot run."""
        if not request.prompt:
            raise ValueError("the prompt is empty")
        if len(request.prompt) >= self.cfg.block_size:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; this model's context is "
                             f"{self.cfg.block_size}, so it may have at most {self.cfg.block_size - 1}")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {request.max_new_tokens}")
        if min(request.prompt) < 0 or max(request.prompt) >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.cfg.vocab_size - 1}")

    def add(self, request: Request) -> int:
        """Queue a request (from any thread); its id names its events."""
        self.validate(request)
        generator = None
        if request.temperature > 0 and request.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.seed)
        limit = min(request.max_new_tokens, self.cfg.block_size - len(request.prompt))
        with self.lock:
            sequence = _Sequence(next(self.ids), request, limit, generator)
            self.waiting.append(sequence)
        return sequence.id

    def cancel(self, id: int) -> None:
        """Drop a request (from any thread): it leaves the batch at the next step, with a "cancelled" event."""
        with self.lock:
            self.cancelled.add(id)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and not self.cancelled

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Decode one token for every running sequence, then prefill the ones that join; their events in order."""
        events: list[Event] = []
        with self.lock:
            cancelled, self.cancelled = self.cancelled, set()
            for sequence in [s for s in self.waiting if s.id in cancelled]:
                self.waiting.remove(sequence)
                self.finished["cancelled"] += 1
                events.append(Event(sequence.id, None, "cancelled"))
            joining = []
            while self.waiting and len(self.running) + len(joining) < self.max_batch:
                joining.append(self.waiting.popleft())
        for sequence in self.running:
            if sequence.id in cancelled and sequence.finished is None:
                sequence.finished = "cancelled"
                self.finished["cancelled"] += 1
                events.append(Event(sequence.id, None, "cancelled"))
        self._leave()
        if self.running:
            n = len(self.running)
            tokens = torch.tensor([[s.last] for s in self.running], device=self.device)  # (n, 1)
            positions = torch.tensor([s.position for s in self.running], device=self.device)  # (n,)
            logits, _ = self.model(tokens, cache=self.cache.rows(0, n), start=positions)  # (n, 1, V)
            for sequence, row_logits in zip(self.running, logits[:, -1]):
                sequence.position += 1
                events.append(self._next(sequence, row_logits))
        for sequence in joining:
            row = len(self.running)
            self.running.append(sequence)
            prompt = torch.tensor([sequence.request.prompt], device=self.device)  # (1, T)
            logits, _ = self.model(prompt, cache=self.cache.rows(row, row + 1), start=0)  # (1, T, V)
            sequence.position = prompt.shape[1]
            events.append(self._next(sequence, logits[0, -1]))
        self._leave()
        return events

    def drop_all(self, reason: str = "error") -> list[Event]:
        """End every request (after a step failed): a `reason` event each, and the engine is empty again."""
        with self.lock:
            dropped = [*self.running, *self.waiting]
            self.running, self.cancelled = [], set()
            self.waiting.clear()
        self.finished[reason] += len(dropped)
        return [Event(sequence.id, None, reason) for sequence in dropped]

    def _next(self, sequence: _Sequence, logits: torch.Tensor) -> Event:
        """Choose a sequence's next token from its logits (V,) and say whether it finished."""
        request = sequence.request
        if request.temperature <= 0:
            token = int(logits.float().argmax())
        else:
            filtered = filter_logits(logits.float()[None] / request.temperature, request.top_k, request.top_p)
            token = int(torch.multinomial(filtered.softmax(-1), 1, generator=sequence.generator))
        sequence.last, sequence.made = token, sequence.made + 1
        if token == self.eos_id or token in request.stop_ids:
            sequence.finished = "stop"
        elif sequence.made >= sequence.limit:
            sequence.finished = "length"
        if sequence.finished:
            self.finished[sequence.finished] += 1
        if request.logprobs is None:
            return Event(sequence.id, token, sequence.finished)
        logprob, top = token_logprobs(logits[None], torch.tensor([token]), request.logprobs)[0]
        return Event(sequence.id, token, sequence.finished, logprob, top)

    def _leave(self) -> None:
        """Finished sequences leave; the last running row moves into each freed row (its cache copied over)."""
        row = 0
        while row < len(self.running):
            if self.running[row].finished is None:
                row += 1
                continue
            last = self.running.pop()
            if row < len(self.running):  # `last` was not the finished one: it takes over the row
                end = last.position
                for keys, values in zip(self.cache.k, self.cache.v):  # (max_batch, nkv, block_size, hs) per layer
                    keys[row, :, :end] = keys[len(self.running), :, :end]
                    values[row, :, :end] = values[len(self.running), :, :end]
                self.running[row] = last
