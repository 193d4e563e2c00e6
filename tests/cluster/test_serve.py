"""`raygpt serve`: the official `openai` client against a real Ray Serve deployment of a trained checkpoint on a free
127.0.0.1 port (the session's local Ray), and `raygpt serve` itself as a user starts and stops it."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from cluster.cli import main
from cluster.config import ServeConfig
from model.checkpoint import load_checkpoint, save_checkpoint
from model.generate import generate_tokens
from tests.conftest import REPO, short_lm_eval_tasks

pytestmark = pytest.mark.kernels  # CI runs these again with the CPU ISA forced to AVX2

KEY = "test-key-0123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_run: Path, ray_session: None) -> Iterator[str]:
    """The run's checkpoint served with an API key; yields the base URL (…/v1)."""
    from ray import serve

    from cluster.serve import start, stop

    os.environ["RAYGPT_TEST_KEY"] = KEY
    try:
        cfg = ServeConfig(port=_free_port(), max_batch=8, api_key_env="RAYGPT_TEST_KEY", precision="fp32")
        url = start(str(trained_run / "checkpoint"), cfg, "shakespeare")
    finally:
        del os.environ["RAYGPT_TEST_KEY"]
    yield url
    stop()
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def alone(trained_run: Path):  # noqa: ANN201
    """Greedy text of a prompt decoded by itself with the sequential decoder, as the server's tokenizer sees it."""
    loaded = load_checkpoint(trained_run / "checkpoint")

    def decode(prompt: str, max_tokens: int) -> str:
        ids = loaded.tokenizer.encode(prompt, add_special_tokens=False).ids
        new = []
        for token in generate_tokens(loaded.model, torch.tensor([ids]), max_tokens, eos_id=loaded.eot_id):
            if int(token) == loaded.eot_id:
                break
            new.append(int(token))
        return loaded.tokenizer.decode(new)

    return decode


PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nBefore we proceed", "KING", "To be", "MENENIUS:\nWhat",
           "O", "And", "The", "CORIOLANUS:", "I will", "Thou", "Good", "My lord", "What is", "Nay"]


def test_completions_models_streaming_stop_and_seeds_through_the_openai_client(client: openai.OpenAI, alone) -> None:  # noqa: ANN001
    [model] = client.models.list().data
    assert model.id == "shakespeare" and model.owned_by == "raygpt"
    done = client.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=24, temperature=0)
    expected = alone("ROMEO:", 24)
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length" and len(expected) > 10
    assert done.usage.completion_tokens == 24 and done.usage.prompt_tokens > 0
    several = client.completions.create(model="shakespeare", prompt=PROMPTS[:3], max_tokens=12, temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert [c.text for c in several.choices] == [alone(p, 12) for p in PROMPTS[:3]]
    stream = client.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=24, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected and len(chunks) > 5
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    stop = expected[len(expected) // 2 : len(expected) // 2 + 2]  # cut in the middle of the greedy continuation
    cut = client.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected[: expected.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed_cut = client.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=24, temperature=0,
                                             stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed_cut) == cut.choices[0].text  # no part of the stop string sent
    sampled = [client.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=16, temperature=1.0,
                                         top_p=0.9, seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_sixteen_concurrent_clients_each_get_what_the_request_gives_alone(client: openai.OpenAI, alone) -> None:  # noqa: ANN001
    def ask(prompt: str) -> str:
        return client.completions.create(model="shakespeare", prompt=prompt, max_tokens=20, temperature=0).choices[0].text

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, PROMPTS))
    assert time.perf_counter() - started < 120  # bounded: 16 × 20 tokens of a tiny model
    assert answers == [alone(p, 20) for p in PROMPTS]


def _health(server: str) -> dict:
    return httpx.get(server.removesuffix("/v1") + "/healthz", headers={"Authorization": f"Bearer {KEY}"}).json()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"max_tokens": 5}, 400, "prompt: Field required"),
        ({"prompt": "", "max_tokens": 5}, 400, "prompt: must not be empty"),
        ({"prompt": [], "max_tokens": 5}, 400, "prompt: must not be empty"),
        ({"prompt": "ROMEO " * 200}, 400, "may have at most 63"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be between 1 and the model's context (64) (0 only with echo), not 0"),
        ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens must be between 1"),
        ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens: Input should be a valid integer"),
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "n": 9}, 400, "n: at most 8 choices (serve.max_batch), not 9"),
        ({"prompt": "x", "logprobs": 6}, 400, "logprobs: Input should be less than or equal to 5"),
        ({"prompt": "x", "echo": True, "stream": True}, 400, "echo: not available with stream"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop: at most 4"),
        ({"prompt": "x", "stop": ["x" * 20_000] * 4}, 400, "stop: at most 4 non-empty strings of at most 256"),
        ({"prompt": "x", "seed": 2**64}, 400, "seed: Input should be less than"),
        ({"prompt": "x", "seed": 2**64, "stream": True}, 400, "seed: Input should be less than"),
        ({"prompt": ["x"] * 33}, 400, "prompt: at most 32 prompts per request (serve.max_prompts), not 33"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model 'gpt-4' does not exist"),
        ({"prompt": [1, 99999]}, 400, "token ids must be in 0..511"),
        ([1, 2], 400, "the body must be a JSON object"),
        ("not json", 400, "the body is not JSON"),
    ],
)
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(
    server: str, body: object, status: int, message: str
) -> None:
    raw = body if isinstance(body, str) else json.dumps(body)
    answer = httpx.post(f"{server}/completions", content=raw, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert message in error["message"] and "\n" not in error["message"] and error["type"]
    fine = httpx.post(f"{server}/completions", json={"prompt": "x", "max_tokens": 2, "whatever": [1], "echo": False},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # unknown fields are ignored
    assert fine.status_code == 200 and len(fine.json()["choices"]) == 1


def test_a_client_that_disconnects_mid_stream_is_dropped_from_the_batch(server: str) -> None:
    before = _health(server)["finished"].get("cancelled", 0)
    body = {"prompt": "ROMEO:", "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first chunk arrived; then the client goes away
    deadline = time.monotonic() + 30
    while _health(server)["finished"].get("cancelled", 0) == before:
        assert time.monotonic() < deadline, _health(server)
        time.sleep(0.2)
    assert _health(server)["running"] == 0


def test_the_api_key_is_required_when_set(server: str) -> None:
    """OpenAI's scheme exactly (a bare key, or another scheme, is refused); without the key only a bare liveness
    answer is public (no model name, no batch, no schema)."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/models"), ("POST", "/completions")):
            answer = httpx.request(method, server + path, json={"prompt": "x"}, headers=headers, timeout=30)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).completions.create(model="shakespeare", prompt="x")
    root = server.removesuffix("/v1")
    assert httpx.get(f"{root}/healthz", timeout=30).json() == {"status": "ok"}
    assert httpx.get(f"{root}/healthz", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()["model"] == "shakespeare"
    assert httpx.get(f"{root}/openapi.json", timeout=30).status_code == 404


def test_a_second_server_on_a_busy_port_or_a_public_one_without_a_key_is_refused(
    server: str, trained_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ray Serve's proxy binds with SO_REUSEPORT: a keyless second `raygpt serve` on the keyed one's port would share
    it. It is refused in one line naming what answers there, before Ray is touched; so is a host beyond loopback
    without a key, unless serve.allow_public."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAYGPT_API_KEY", raising=False)
    port = server.removesuffix("/v1").rsplit(":", 1)[1]
    assert main(["serve", str(trained_run / "checkpoint"), "--port", port]) == 2
    err = capsys.readouterr().err
    assert err == (f"raygpt: error: serve.port {port} on 127.0.0.1 is in use (a keyed raygpt server answers there); "
                   "stop it or choose another --port (Address already in use)\n")
    assert main(["serve", str(trained_run / "checkpoint"), "--host", "0.0.0.0", "--port", port]) == 2
    assert "serve.host 0.0.0.0 listens beyond this machine without an API key: set RAYGPT_API_KEY" in capsys.readouterr().err
    assert main(["serve", str(trained_run / "checkpoint"), "--host", "0.0.0.0", "--port", port,
                 "serve.allow_public=true"]) == 2  # allowed past the key rule, and still refused: the port is busy
    assert "is in use" in capsys.readouterr().err


def test_raygpt_serve_starts_on_a_run_dir_and_stops_on_ctrl_c(trained_run: Path, tmp_path: Path) -> None:
    """The command as a user runs it, on a copied run dir whose int8 checkpoint it serves (quantized ones serve too)."""
    from model.quantize import quantize_model

    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoint", run / "checkpoint")
    shutil.copy(trained_run / "config.yaml", run / "config.yaml")
    loaded = load_checkpoint(run / "checkpoint")
    record = quantize_model(loaded.model, "int8", 32, None, False, 0.01)
    save_checkpoint(loaded.model, run / "quantized" / "int8", loaded.tokenizer_file,
                    extra={"step": loaded.step, "eot_token": loaded.eot_token, "quantization": record})
    int8 = load_checkpoint(run / "quantized" / "int8")
    prompt = int8.tokenizer.encode("ROMEO:", add_special_tokens=False).ids
    expected = int8.tokenizer.decode([int(t) for t in generate_tokens(int8.model, torch.tensor([prompt]), 6)])
    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "RAYGPT_API_KEY": ""}
    argv = [sys.executable, "-m", "cluster.cli", "serve", str(run), "--port", str(port), "serve.checkpoint=quantized/int8",
            "serve.precision=fp32"]
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = process.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith(f"[serve] shakespeare ({run}/quantized/int8) at http://127.0.0.1:{port}/v1"), first
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                            json={"prompt": "ROMEO:", "max_tokens": 6, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["model"] == "shakespeare"  # no key set: none asked
        assert answer.json()["choices"][0]["text"] == expected
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and out.strip().splitlines()[-1] == "[serve] stopped", out
    assert len(out.splitlines()) <= 3, out  # Ray Serve's own logging goes to RUN_DIR/logs/console.log
    assert "Application 'raygpt' is ready" in (run / "logs" / "console.log").read_text()
    bad = subprocess.run([*argv[:4], str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == (f"raygpt: error: {tmp_path}: neither a run directory (no "
                                                          "config.yaml) nor a checkpoint (no config.json)")
    missing = subprocess.run([*argv[:5], "serve.checkpoint=quantized/nope"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip() == (f"raygpt: error: {run}/quantized/nope: not a "
                                                                  "checkpoint (no config.json)")


def test_the_banner_names_the_address_clients_use() -> None:
    """A wildcard host is every interface: the banner names this node's address, not 127.0.0.1."""
    import ray

    from cluster.serve import _url_host

    assert _url_host("0.0.0.0") == ray.util.get_node_ip_address() != "127.0.0.1"
    assert _url_host("127.0.0.1") == "127.0.0.1" and _url_host("::1") == "[::1]"


def test_logprobs_echo_and_n_as_lm_evals_local_completions_asks(client: openai.OpenAI, trained_run: Path) -> None:
    from evaluation.lm import RaygptLM

    lm = RaygptLM(str(trained_run / "checkpoint"), dtype="float32")
    ids = lm.tok_encode("ROMEO:\nWhat say you, my lord?")
    echoed = client.completions.create(model="shakespeare", prompt=ids, max_tokens=0, echo=True, logprobs=3)
    [choice] = echoed.choices
    logprobs = choice.logprobs
    assert choice.text == lm.tok_decode(ids) and logprobs.token_logprobs[0] is None and len(logprobs.tokens) == len(ids)
    assert all(len(top) <= 3 for top in logprobs.top_logprobs[1:]) and logprobs.text_offset[:2] == [0, len(logprobs.tokens[0])]
    [(ours, _)] = lm._loglikelihood_tokens([(("", ""), ids[:1], ids[1:])])  # raygpt's own loglikelihood
    assert sum(logprobs.token_logprobs[1:]) == pytest.approx(ours, abs=1e-4)
    twice = client.completions.create(model="shakespeare", prompt=[ids, ids[:5]], max_tokens=0, echo=True, logprobs=3, n=2)
    assert [c.logprobs.token_logprobs for c in twice.choices[:2]] == [logprobs.token_logprobs] * 2  # each prompt's own
    assert len(twice.choices[2].logprobs.tokens) == 5 and twice.usage.prompt_tokens == len(ids) + 5
    for token_lp, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
        assert token_lp <= max(top.values()) + 1e-6
    greedy = client.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=6, temperature=0, logprobs=2)
    lps = greedy.choices[0].logprobs  # each greedy token is its step's most likely one
    assert len(lps.tokens) == 6 and all(lp == pytest.approx(max(top.values())) for lp, top in zip(lps.token_logprobs, lps.top_logprobs))
    many = client.completions.create(model="shakespeare", prompt=["ROMEO:", "KING"], max_tokens=8, temperature=1.0, seed=3, n=3)
    assert [c.index for c in many.choices] == list(range(6)) and len({c.text for c in many.choices[:3]}) > 1
    again = client.completions.create(model="shakespeare", prompt=["ROMEO:", "KING"], max_tokens=8, temperature=1.0, seed=3, n=3)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]  # choice j samples with seed + j
    assert many.usage.prompt_tokens == len(lm.tok_encode("ROMEO:")) + len(lm.tok_encode("KING"))


def test_chat_completions_through_the_openai_client_streaming_and_not(client: openai.OpenAI, server: str) -> None:
    messages = [{"role": "system", "content": "You are a player."}, {"role": "user", "content": "Speak, ROMEO."}]
    done = client.chat.completions.create(model="shakespeare", messages=messages, max_tokens=12, temperature=0)
    [choice] = done.choices
    assert done.object == "chat.completion" and choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert done.usage.completion_tokens <= 12 and done.usage.prompt_tokens > 10
    chunks = list(client.chat.completions.create(model="shakespeare", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    for bad, message in (([{"role": "robot", "content": "hi"}], "messages[0].role: 'robot' is not one of"),
                         ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
                          "messages[1]: an empty assistant turn"), ([], "messages: List should have at least 1 item")):
        answer = httpx.post(f"{server}/chat/completions", json={"messages": bad}, headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 400 and message in answer.json()["error"]["message"]


def test_lm_evals_own_api_clients_against_the_server(server: str, trained_run: Path, shared_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's `local-completions` scores a loglikelihood task through /v1/completions (echo + logprobs) as
    `lm_eval --model raygpt` does, within 1e-3; `local-chat-completions` runs a generation task with the chat
    template through /v1/chat/completions."""
    import lm_eval

    from evaluation.lm import RaygptLM
    from model.export import export

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    hf_dir = export(trained_run / "checkpoint", tmp_path / "hf")  # the tokenizer lm-eval encodes with
    choice, generate = short_lm_eval_tasks(shared_data, tmp_path)
    args = f"base_url={server}/completions,model=shakespeare,tokenizer={hf_dir},tokenizer_backend=huggingface,max_retries=1"
    served = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[choice], bootstrap_iters=0,
                                     log_samples=True)
    ours = lm_eval.simple_evaluate(model=RaygptLM(str(trained_run / "checkpoint"), dtype="float32"), tasks=[choice],
                                   bootstrap_iters=0, log_samples=True)
    pairs = [(a[0][0], b[0][0]) for sa, sb in zip(served["samples"]["lines_mc"], ours["samples"]["lines_mc"])
             for a, b in zip(sa["resps"], sb["resps"])]
    assert len(pairs) == 18 and all(a == pytest.approx(b, abs=1e-3) for a, b in pairs)
    assert served["results"]["lines_mc"]["acc,none"] == ours["results"]["lines_mc"]["acc,none"]
    chat_args = f"base_url={server}/chat/completions,model=shakespeare,tokenizer_backend=None,max_retries=1"
    chatted = lm_eval.simple_evaluate(model="local-chat-completions", model_args=chat_args, tasks=[generate],
                                      apply_chat_template=True, bootstrap_iters=0, log_samples=True)
    samples = chatted["samples"]["lines_gen"]
    assert len(samples) == 6 and all(isinstance(s["resps"][0][0], str) for s in samples)
    for sample in samples:  # lm-eval sent each document as a conversation; the server applied the chat template
        assert json.loads(sample["arguments"][0][0][0]) == [{"role": "user", "content": sample["doc"]["prompt"]}]


def test_a_chat_request_to_a_model_without_a_template_is_refused_in_openais_format() -> None:
    from cluster.serve_api import BadRequest, chat_prompt
    from core.chat import CHATML

    with pytest.raises(BadRequest) as refused:
        chat_prompt(None, [{"role": "user", "content": "hi"}])  # what the server answers for such a checkpoint
    body = json.loads(refused.value.response().body)["error"]
    assert refused.value.status == 400 and body["code"] == "no_chat_template" and "use /v1/completions" in body["message"]
    assert chat_prompt(CHATML, [{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
