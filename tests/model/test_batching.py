"""Continuous batching: requests of different lengths decode together, join and leave at different steps, and each
gets the tokens it gets decoded alone (greedy, and seeded sampling)."""

from __future__ import annotations

import pytest
import torch

from model.batching import Engine, Event, Request
from model.generate import generate_tokens
from model.gpt import GPT
from tests.conftest import ARCHS, perturbed_model

pytestmark = pytest.mark.kernels  # CI runs these again with the CPU ISA forced to AVX2


def _run(engine: Engine, requests: list[Request], cancel_after: dict[int, int] | None = None,
         ) -> tuple[list[list[int]], list[str], int]:
    """Every request's tokens and finish reason, and the most rows that ran together."""
    ids = [engine.add(r) for r in requests]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    finish: dict[int, str] = {}
    widest = 0
    while not engine.idle:
        events: list[Event] = engine.step()
        widest = max(widest, len(engine.running))
        for event in events:
            assert event.id not in finish  # nothing after the end
            if event.token is not None:
                tokens[event.id].append(event.token)
            if event.finish:
                finish[event.id] = event.finish
            index = ids.index(event.id)
            if cancel_after and cancel_after.get(index) == len(tokens[event.id]) and not event.finish:
                engine.cancel(event.id)
    return [tokens[i] for i in ids], [finish[i] for i in ids], widest


def _alone(model: GPT, request: Request, eos_id: int | None = None) -> list[int]:
    """The request decoded by itself with the sequential KV-cache decoder (`raygpt generate`'s)."""
    out = []
    for token in generate_tokens(model, torch.tensor([request.prompt]), request.max_new_tokens, request.temperature,
                                 request.top_k, request.top_p, eos_id, request.seed):
        out.append(int(token))
        if int(token) == eos_id:
            break
    return out


def _prompts(n: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n, (length,), generator=generator).tolist() for length in lengths]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_batched_equals_each_request_alone(arch: str) -> None:
    model = perturbed_model(arch)
    lengths, budgets = [3, 17, 9, 30, 1, 12, 5, 21, 40], [20, 5, 12, 20, 8, 16, 3, 20, 23]
    requests = [Request(p, b) for p, b in zip(_prompts(300, lengths), budgets)]
    tokens, finish, widest = _run(Engine(model, max_batch=4, eos_id=None), requests)
    assert widest == 4  # full rows while requests waited; they joined as others left
    for request, got in zip(requests, tokens):
        assert got == _alone(model, request)
    assert [len(t) for t in tokens] == budgets and set(finish) == {"length"}


def test_end_of_text_and_the_context_end_finish_a_request_and_free_its_row() -> None:
    model = perturbed_model("llama")
    prompts = _prompts(300, [5, 8, 60])
    first = _alone(model, Request(prompts[0], 1))[0]  # make the first request's first token the end of text
    tokens, finish, _ = _run(Engine(model, max_batch=2, eos_id=first), [Request(p, 50) for p in prompts])
    assert tokens[0] == [first] and finish[0] == "stop"
    assert tokens[1] == _alone(model, Request(prompts[1], 50), eos_id=first)
    assert len(tokens[2]) == 4 and finish[2] == "length"  # 60 + 4 = the context of 64


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch() -> None:
    model = perturbed_model("gpt2")
    prompts = _prompts(300, [4, 11, 7, 2])
    sampled = [Request(p, 15, temperature=0.9, top_k=40, top_p=0.95, seed=i) for i, p in enumerate(prompts)]
    tokens, _, _ = _run(Engine(model, max_batch=3, eos_id=None), sampled + [Request(prompts[0], 30)])
    for request, got in zip(sampled, tokens):
        assert got == _alone(model, request)
    again, _, _ = _run(Engine(model, max_batch=1, eos_id=None), sampled)  # one at a time: the same draws
    assert again == tokens[:4] and len({tuple(t) for t in again}) == 4


def test_a_cancelled_request_leaves_and_the_others_are_unaffected() -> None:
    model = perturbed_model("llama")
    requests = [Request(p, 12) for p in _prompts(300, [6, 13, 3])]
    tokens, finish, _ = _run(Engine(model, max_batch=3, eos_id=None), requests, cancel_after={0: 4})
    assert finish == ["cancelled", "length", "length"] and len(tokens[0]) == 4
    assert tokens[1:] == [_alone(model, r) for r in requests[1:]]
    engine = Engine(model, max_batch=1, eos_id=None)  # cancelled while still waiting for a row
    engine.add(requests[0])  # takes the only row
    waiting = engine.add(requests[1])
    engine.cancel(waiting)
    assert Event(waiting, None, "cancelled") in engine.step()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (Request([], 5), "the prompt is empty"),
        (Request([1] * 64, 5), "the prompt has 64 tokens; this model's context is 64, so it may have at most 63"),
        (Request([1, 2], 0), "max_new_tokens must be at least 1, not 0"),
        (Request([1, 300], 5), "token ids must be in 0..299"),
    ],
)
def test_requests_the_model_cannot_run_are_refused_with_one_line(request_: Request, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.") + "$"):
        Engine(perturbed_model("llama"), max_batch=2, eos_id=None).add(request_)


def test_after_a_failed_step_every_request_ends_with_an_error_and_the_engine_serves_again() -> None:
    model = perturbed_model("llama")
    engine = Engine(model, max_batch=1, eos_id=None)
    first, second = engine.add(Request([1, 2, 3], 5)), engine.add(Request([4, 5], 5))
    engine.step()  # the first runs, the second waits
    assert engine.drop_all() == [Event(first, None, "error"), Event(second, None, "error")]  # running, then waiting
    assert engine.idle and engine.finished["error"] == 2
    tokens, finish, _ = _run(engine, [Request([1, 2, 3], 5)])
    assert tokens == [_alone(model, Request([1, 2, 3], 5))] and finish == ["length"]
