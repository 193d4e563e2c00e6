"""`raygpt serve`: a checkpoint behind an OpenAI-compatible completions and chat API on Ray Serve, with continuous
batching.

    raygpt serve runs/demo                                   # http://127.0.0.1:8000/v1, the run's final checkpoint
    raygpt serve runs/demo serve.checkpoint=quantized/int8 --port 8001 --replicas 2
    RAYGPT_API_KEY=secret raygpt serve runs/demo --host 0.0.0.0   # requests need `Authorization: Bearer secret`

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="demo", prompt="def fib(n):", max_tokens=64, temperature=0)
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], stream=True)

Routes: `GET /healthz`, `GET /v1/models`, `POST /v1/completions` (prompt: a string, a list of strings, or token
ids; max_tokens, temperature, top_p, stop, seed, n, stream as server-sent events, logprobs (top 0-5) and echo, which
with max_tokens 0 returns the prompt's log-probabilities, as lm-eval's `local-completions` asks), `POST
/v1/chat/completions` (messages formatted with the checkpoint's chat template, `core.chat`; the reply ends at the end
of the turn; refused with OpenAI's error JSON when the checkpoint has no template). Fields we do not implement are
ignored. Each replica runs one `model.batching.Engine` on a thread: the requests of all its clients decode together,
joining and leaving the batch as they come and finish; a client that disconnects mid-stream is dropped from the batch.
A bad request is answered with OpenAI's error JSON and a 4xx status, never a crash. Ray Serve scales the replicas
between serve.min_replicas and serve.max_replicas. The request formats, log-probabilities, the text streaming and the
bridge to the engine's thread are in cluster/serve_api.py; what to serve and the checks before starting, in
cluster/serve_launch.py.
"""


import asyncio
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from cluster.config import ServeConfig
from cluster.serve_api import (
    MAX_STOP, MAX_STOP_CHARS, BadRequest, ChatRequest, CompletionRequest, EngineLoop, TextStream, chat_prompt,
    choice_chunk, logprobs_json, validation_message,
)
from core.chat import stop_ids
from core.errors import UserError

APP = "raygpt"
api = FastAPI(title="raygpt", docs_url=None, redoc_url=None, openapi_url=None)  # no schema route: nothing unkeyed


@serve.deployment(name="raygpt")
@serve.ingress(api)
class CompletionServer:
    """One replica: the checkpoint's model and tokenizer, and an engine decoding every client's requests together."""

    def __init__(self, checkpoint: str, model_name: str, max_batch: int, api_key_sha256: str | None,
                 precision: str = "auto", max_prompts: int = 32) -> None:
        from model.batching import Engine
        from model.checkpoint import load_for_inference

        loaded, _ = load_for_inference(checkpoint, None, precision)  # the replica's GPU when it reserved one
        self.model, self.tokenizer, self.eot = loaded.model, loaded.tokenizer, loaded.eot_id
        self.template, self.max_batch = loaded.chat_template, max_batch
        self.chat_stops = tuple(stop_ids(self.tokenizer, None, self.template))  # a reply ends with its turn (or text)
        self.name, self.key_sha256, self.created = model_name, api_key_sha256, int(time.time())
        self.context, self.max_prompts = loaded.config.block_size, max_prompts
        self.engine = EngineLoop(Engine(self.model, max_batch=max_batch, eos_id=self.eot))

    # ------------------------------------------------------------------ routes
    @api.get("/healthz")
    def healthz(self, request: Request) -> dict[str, Any]:
        """Liveness, and this replica's batch: sequences decoding, waiting for a row, and finished by reason. On a
        keyed server only `{"status": "ok"}` without the key: nothing about the model is public."""
        if self._auth(request) is not None:
            return {"status": "ok"}
        engine = self.engine.engine
        return {"status": "ok", "model": self.name, "running": len(engine.running), "waiting": len(engine.waiting),
                "finished": dict(engine.finished)}

    @api.get("/v1/models")
    def models(self, request: Request) -> JSONResponse:
        if (denied := self._auth(request)) is not None:
            return denied
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "raygpt"}
        return JSONResponse({"object": "list", "data": [card]})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            body = await self._body(request, CompletionRequest)
            prompts = self._prompts(body)
            limit = body.max_tokens if body.max_tokens is not None else 16
            if body.echo and body.stream:
                raise BadRequest(400, "echo: not available with stream", "echo")
            if not (body.echo if limit == 0 else 1 <= limit <= self.context):
                raise BadRequest(400, f"max_tokens must be between 1 and the model's context ({self.context}) (0 only "
                                      f"with echo), not {limit}", "max_tokens")
            generations = self._generations(body, prompts, limit, (), body.logprobs)
        except BadRequest as e:
            return e.response()
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.name}
        if body.stream:
            return StreamingResponse(self._stream(generations, body, meta, chat=False), media_type="text/event-stream")
        choices = await asyncio.gather(*(self._complete(g, body.stops) for g in generations))
        usage = self._usage(prompts, sum(c.pop("tokens") for c in choices))
        k = body.logprobs
        echoed = ([await self._prompt_logprobs(p, k) for p in prompts] if body.echo and k is not None
                  else [])  # once per prompt, whatever `n`
        for index, (choice, generation) in enumerate(zip(choices, generations)):
            choice["index"] = index
            ids, entries = choice.pop("ids"), choice.pop("entries")
            if body.echo:
                choice["text"] = self.tokenizer.decode(generation.prompt) + choice["text"]
                if echoed:
                    ids, entries = generation.prompt + ids, echoed[index // body.n] + entries
            choice["logprobs"] = None if k is None else logprobs_json(self.tokenizer, ids, entries, k)
        return {**meta, "object": "text_completion", "choices": choices, "usage": usage}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        """A conversation formatted with the checkpoint's chat template; the reply ends at the end of the turn."""
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            body = await self._body(request, ChatRequest)
            text = chat_prompt(self.template, body.messages)
            prompt = self.tokenizer.encode(text, add_special_tokens=False).ids
            limit = body.max_completion_tokens or body.max_tokens or max(1, self.context - len(prompt))
            generations = self._generations(body, [prompt], limit, self.chat_stops, None)
        except BadRequest as e:
            return e.response()
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.name}
        if body.stream:
            return StreamingResponse(self._stream(generations, body, meta, chat=True), media_type="text/event-stream")
        choices = await asyncio.gather(*(self._complete(g, body.stops) for g in generations))
        out = [{"index": i, "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)]
        usage = self._usage([prompt], sum(c["tokens"] for c in choices))
        return {**meta, "object": "chat.completion", "choices": out, "usage": usage}

    # ------------------------------------------------------------------ helpers
    def _auth(self, request: Request) -> JSONResponse | None:
        if self.key_sha256 is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")  # OpenAI's: `Bearer KEY`, nothing else
        if scheme == "Bearer" and hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), self.key_sha256):
            return None
        return BadRequest(401, "missing or wrong API key (Authorization: Bearer KEY)", None, "invalid_api_key").response()

    async def _body(self, request: Request, kind: type[Any]) -> Any:
        """The request's JSON as `kind` (CompletionRequest, ChatRequest), checked: model, stop strings, n."""
        try:
            raw = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest(400, "the body is not JSON") from None
        if not isinstance(raw, dict):
            raise BadRequest(400, "the body must be a JSON object")
        try:
            body = kind.model_validate(raw)
        except ValidationError as e:
            message, param = validation_message(e)
            raise BadRequest(400, message, param) from None
        if body.model not in (None, self.name):
            raise BadRequest(404, f"model {body.model!r} does not exist; this server has {self.name!r}", "model",
                             "model_not_found")
        if len(body.stops) > MAX_STOP or any(not 0 < len(s) <= MAX_STOP_CHARS for s in body.stops):
            raise BadRequest(400, f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters",
                             "stop")
        if body.n > self.max_batch:
            raise BadRequest(400, f"n: at most {self.max_batch} choices (serve.max_batch), not {body.n}", "n")
        return body

    def _prompts(self, body: CompletionRequest) -> list[list[int]]:
        """The prompt(s) as token ids."""
        if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int):
            if len(body.prompt) > self.max_prompts:
                raise BadRequest(400, f"prompt: at most {self.max_prompts} prompts per request (serve.max_prompts), "
                                      f"not {len(body.prompt)}", "prompt")
        prompt = body.prompt
        if isinstance(prompt, str):
            texts: list[str] | None = [prompt]
        elif prompt and all(isinstance(p, str) for p in prompt):
            texts = list(prompt)  # type: ignore[arg-type]
        else:
            texts = None
        if texts is not None:
            prompts = [self.tokenizer.encode(t, add_special_tokens=False).ids if t else [] for t in texts]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = [list(p) for p in prompt]  # type: ignore[union-attr]
        if not prompts or any(not p for p in prompts):
            raise BadRequest(400, "prompt: must not be empty", "prompt")
        return prompts

    def _generations(self, body: Any, prompts: list[list[int]], limit: int, stops: tuple[int, ...],
                     logprobs: int | None) -> list[Any]:
        """`n` engine requests per prompt (choice j seeded with seed + j), each checked against the model."""
        from model.batching import Request as Generation

        top_p = float(body.top_p) if body.top_p < 1 else None
        generations = [Generation(ids, max(limit, 1), float(body.temperature), top_p=top_p, stop_ids=stops,
                                  seed=None if body.seed is None else body.seed + j, logprobs=logprobs)
                       for ids in prompts for j in range(body.n)]
        for index, generation in enumerate(generations):
            try:
                self.engine.engine.validate(generation)
            except ValueError as e:
                where = f"[{index // body.n}]" if len(prompts) > 1 else ""
                raise BadRequest(400, f"prompt{where}: {e}", "prompt",
                                 "context_length_exceeded" if "context" in str(e) else None) from None
        if limit == 0:  # echo only: nothing is generated
            generations = [replace(g, max_new_tokens=0) for g in generations]
        return generations

    @staticmethod
    def _usage(prompts: list[list[int]], generated: int) -> dict[str, int]:
        """Token counts: each prompt once (whatever `n`), every generated token (the one that ended a choice too)."""
        read = sum(len(p) for p in prompts)
        return {"prompt_tokens": read, "completion_tokens": generated, "total_tokens": read + generated}

    async def _prompt_logprobs(self, ids: list[int], k: int) -> list[Any]:
        """`echo`'s log-probabilities of the prompt's tokens, each given the ones before (the first has none): one
        forward pass, off the event loop."""
        import torch

        from model.batching import token_logprobs

        def run() -> list[Any]:
            with torch.inference_mode():
                device = next(self.model.parameters()).device
                logits, _ = self.model(torch.tensor([ids], device=device))  # (1, T, V)
            return [None, *token_logprobs(logits[0, :-1], torch.tensor(ids[1:]), k)]

        return await asyncio.to_thread(run)

    async def _tokens(self, generation: Any, text: TextStream, events: list[Any] | None = None,
                      ) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, finish reason or None) as the engine decodes; the sequence is dropped from the batch if the
        caller goes away (a disconnected client) or a stop string ends it. Each token's event goes to `events`."""
        if generation.max_new_tokens == 0:  # echo only
            yield "", "length"
            return
        id, queue = self.engine.submit(generation)
        try:
            while True:
                event = await queue.get()
                if event.finish == "error":
                    raise RuntimeError("the decoding step of this request failed (see the server's log)")
                finish = event.finish
                if events is not None and event.token is not None:
                    events.append(event)
                piece = ""
                if event.token is not None and event.token != self.eot and event.token not in generation.stop_ids:
                    piece = text.add(event.token)
                if text.stopped:
                    finish = "stop"
                if finish is not None:
                    yield piece + text.rest(), "stop" if finish == "stop" else "length"
                    return
                yield piece, None
        finally:
            self.engine.cancel(id)  # a no-op when it finished

    async def _complete(self, generation: Any, stop: list[str]) -> dict[str, Any]:
        """One choice: its text, finish reason, generated token ids with their (log p, top) entries (every token the
        model chose, the one that ended it included, as OpenAI's logprobs list them) and token count."""
        text, pieces, finish, events = TextStream(self.tokenizer, stop), [], "length", []
        async for piece, reason in self._tokens(generation, text, events):
            pieces.append(piece)
            finish = reason or finish
        return {"text": "".join(pieces), "logprobs": None, "finish_reason": finish, "tokens": len(events),
                "ids": [e.token for e in events], "entries": [(e.logprob, e.top) for e in events]}

    async def _stream(self, generations: list[Any], body: Any, meta: dict[str, Any], chat: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text of each choice (by index), its last with finish_reason (chat:
        a first chunk per choice with the assistant role); with stream_options.include_usage, a last chunk of token
        counts."""
        queue: asyncio.Queue = asyncio.Queue()
        stop, usage = body.stops, bool((body.stream_options or {}).get("include_usage"))
        kind = "chat.completion.chunk" if chat else "text_completion"
        texts = [TextStream(self.tokenizer, stop) for _ in generations]
        made: list[list[Any]] = [[] for _ in generations]  # each choice's token events (counted as non-streaming does)

        async def pump(index: int, generation: Any) -> None:
            async for piece, finish in self._tokens(generation, texts[index], made[index]):
                await queue.put((index, piece, finish))
            await queue.put(None)

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
        try:
            if chat:
                roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(generations))]
                yield f"data: {json.dumps({**meta, 'object': kind, 'choices': roles})}\n\n"
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                index, piece, finish = item
                if piece or finish:
                    choice = choice_chunk(chat, index, piece, finish)
                    yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"
            if usage:
                prompts = [g.prompt for g in generations[:: body.n]]  # n choices per prompt, in order
                counts = self._usage(prompts, sum(len(events) for events in made))
                yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': counts})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:  # the client went away: its sequences leave the batch
                task.cancel()


def start(checkpoint: str, cfg: ServeConfig, model_name: str) -> str:
    """Deploy the app on the connected Ray cluster and return its base URL (…/v1); `stop()` takes it down."""
    key = os.environ.get(cfg.api_key_env) or None
    options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    if cfg.num_cpus >= 1:
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(int(cfg.num_cpus))}}
    deployment = CompletionServer.options(
        ray_actor_options=options,
        max_ongoing_requests=max(4 * cfg.max_batch, 32),
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                            "target_ongoing_requests": cfg.max_batch},
    )
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    key_sha256 = hashlib.sha256(key.encode()).hexdigest() if key else None
    app = deployment.bind(checkpoint, model_name, cfg.max_batch, key_sha256, cfg.precision, cfg.max_prompts)
    try:
        serve.run(app, name=APP, route_prefix="/")
    except RuntimeError as e:  # Serve's message names the app; the replica's traceback is in the log
        raise UserError(f"serve: the model server did not start ({str(e).splitlines()[0]}); the replica's error is "
                        "in the log (RUN_DIR/logs/console.log, or run with --verbose)") from None
    return f"http://{_url_host(cfg.host)}:{cfg.port}/v1"


def _url_host(host: str) -> str:
    """The address a client uses: a wildcard is every interface, named by this node's address."""
    import ray

    host = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "") else host
    return f"[{host}]" if ":" in host else host


def stop() -> None:
    serve.delete(APP)
