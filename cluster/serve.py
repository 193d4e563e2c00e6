"""`raygpt serve`: a checkpoint behind an OpenAI-compatible completions API on Ray Serve, with continuous batching.

    raygpt serve runs/demo                                   # http://127.0.0.1:8000/v1, the run's final checkpoint
    raygpt serve runs/demo serve.checkpoint=quantized/int8 --port 8001 --replicas 2
    RAYGPT_API_KEY=secret raygpt serve runs/demo --host 0.0.0.0   # requests need `Authorization: Bearer secret`

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="demo", prompt="def fib(n):", max_tokens=64, temperature=0)

Routes: `GET /healthz`, `GET /v1/models`, `POST /v1/completions` (prompt: a string, a list of strings, or token
ids; max_tokens, temperature, top_p, stop, seed, stream as server-sent events; fields we do not implement are
ignored). Each replica runs one `model.batching.Engine` on a thread: the requests of all its clients decode together,
joining and leaving the batch as they come and finish; a client that disconnects mid-stream is dropped from the batch.
A bad request is answered with OpenAI's error JSON and a 4xx status, never a crash. Ray Serve scales the replicas
between serve.min_replicas and serve.max_replicas. The request format, the text streaming and the bridge to the
engine's thread are in cluster/serve_api.py.
"""


import asyncio
import hashlib
import hmac
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from cluster.config import ClusterConfig, ServeConfig
from cluster.serve_api import MAX_STOP, MAX_STOP_CHARS, BadRequest, CompletionRequest, EngineLoop, TextStream, validation_message
from core.errors import UserError
from core.layout import RunLayout, join

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
            body, prompts = await self._parse(request)
            from model.batching import Request as Generation

            limit = body.max_tokens if body.max_tokens is not None else 16
            if not 1 <= limit <= self.context:
                raise BadRequest(400, f"max_tokens must be between 1 and the model's context ({self.context}), "
                                      f"not {limit}", "max_tokens")
            temperature = float(body.temperature)
            generations = [Generation(ids, limit, temperature, top_p=float(body.top_p) if body.top_p < 1 else None,
                                      seed=body.seed) for ids in prompts]
            for index, generation in enumerate(generations):
                try:
                    self.engine.engine.validate(generation)
                except ValueError as e:
                    raise BadRequest(400, f"prompt{f'[{index}]' if len(prompts) > 1 else ''}: {e}", "prompt",
                                     "context_length_exceeded" if "context" in str(e) else None) from None
        except BadRequest as e:
            return e.response()
        stop = body.stops
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.name}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._stream(generations, stop, meta, usage), media_type="text/event-stream")
        choices = await asyncio.gather(*(self._complete(g, stop) for g in generations))
        usage_out = sum(c.pop("tokens") for c in choices)
        usage_in = sum(len(g.prompt) for g in generations)
        for index, choice in enumerate(choices):
            choice["index"] = index
        return {**meta, "object": "text_completion", "choices": choices,
                "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out, "total_tokens": usage_in + usage_out}}

    # ------------------------------------------------------------------ helpers
    def _auth(self, request: Request) -> JSONResponse | None:
        if self.key_sha256 is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")  # OpenAI's: `Bearer KEY`, nothing else
        if scheme == "Bearer" and hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), self.key_sha256):
            return None
        return BadRequest(401, "missing or wrong API key (Authorization: Bearer KEY)", None, "invalid_api_key").response()

    async def _parse(self, request: Request) -> tuple[CompletionRequest, list[list[int]]]:
        try:
            raw = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest(400, "the body is not JSON") from None
        if not isinstance(raw, dict):
            raise BadRequest(400, "the body must be a JSON object")
        try:
            body = CompletionRequest.model_validate(raw)
        except ValidationError as e:
            message, param = validation_message(e)
            raise BadRequest(400, message, param) from None
        if body.model not in (None, self.name):
            raise BadRequest(404, f"model {body.model!r} does not exist; this server has {self.name!r}", "model",
                             "model_not_found")
        if len(body.stops) > MAX_STOP or any(not 0 < len(s) <= MAX_STOP_CHARS for s in body.stops):
            raise BadRequest(400, f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters",
                             "stop")
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
        return body, prompts

    async def _tokens(self, generation: Any, text: TextStream) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, finish reason or None) as the engine decodes; the sequence is dropped from the batch if the
        caller goes away (a disconnected client) or a stop string ends it."""
        id, queue = self.engine.submit(generation)
        try:
            while True:
                event = await queue.get()
                if event.finish == "error":
                    raise RuntimeError("the decoding step of this request failed (see the server's log)")
                finish = event.finish
                piece = ""
                if event.token is not None and event.token != self.eot:
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
        text, pieces, finish = TextStream(self.tokenizer, stop), [], "length"
        async for piece, reason in self._tokens(generation, text):
            pieces.append(piece)
            finish = reason or finish
        return {"text": "".join(pieces), "logprobs": None, "finish_reason": finish, "tokens": len(text.ids)}

    async def _stream(self, generations: list[Any], stop: list[str], meta: dict[str, Any], usage: bool,
                      ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text of each prompt (by index), its last with finish_reason;
        with `usage`, a final chunk of token counts."""
        queue: asyncio.Queue = asyncio.Queue()
        texts = [TextStream(self.tokenizer, stop) for _ in generations]

        async def pump(index: int, generation: Any) -> None:
            async for piece, finish in self._tokens(generation, texts[index]):
                await queue.put((index, piece, finish))
            await queue.put(None)

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                index, piece, finish = item
                if piece or finish:
                    choice = {"text": piece, "index": index, "logprobs": None, "finish_reason": finish}
                    yield f"data: {json.dumps({**meta, 'object': 'text_completion', 'choices': [choice]})}\n\n"
            if usage:
                made, read = sum(len(t.ids) for t in texts), sum(len(g.prompt) for g in generations)
                counts = {"prompt_tokens": read, "completion_tokens": made, "total_tokens": read + made}
                yield f"data: {json.dumps({**meta, 'object': 'text_completion', 'choices': [], 'usage': counts})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:  # the client went away: its sequences leave the batch
                task.cancel()


class Target(NamedTuple):
    """What `raygpt serve TARGET [serve.key=value ...]` serves, and how."""

    checkpoint: str
    serve: ServeConfig
    cluster: ClusterConfig
    model_name: str
    log_file: Path
    """where the console's filtered lines go (the run's console.log, or a temp file for a bare checkpoint)"""


def resolve_target(target: str, overrides: list[str]) -> Target:
    """A local run directory (its config.yaml's serve and cluster sections; its final checkpoint or serve.checkpoint)
    or a checkpoint folder, local or a URI (default sections)."""
    from cluster.config import load_config, load_serve_config
    from model.checkpoint import CONFIG
    from model.checkpoint import load_config as checkpoint_config

    bad = [o for o in overrides if not o.startswith("serve.")]
    if bad:
        raise UserError(f"{bad[0]}: only serve.* keys can be set here (e.g. serve.max_batch=8)")
    layout = RunLayout.of(target)
    if not layout.remote and Path(layout.config).is_file():
        run = load_config(layout.config, overrides)
        cfg = run.serve
        checkpoint = str(join(layout.run_dir, cfg.checkpoint) if cfg.checkpoint else layout.checkpoint)  # as moved
        checkpoint_config(checkpoint)  # a missing or broken checkpoint: one line here, not a replica's traceback
        return Target(checkpoint, cfg, run.cluster, cfg.model_name or run.name, layout.console_log)
    if (Path(target) / CONFIG).is_file() or "://" in target:  # a checkpoint (a URI: checked when it loads)
        cfg = load_serve_config(overrides)
        if cfg.checkpoint:
            raise UserError("serve.checkpoint: only for a run directory; give the checkpoint folder itself")
        name = cfg.model_name or Path(target.rstrip("/")).name
        return Target(target, cfg, ClusterConfig(), name, Path(tempfile.gettempdir()) / "raygpt-serve.log")
    raise UserError(f"{target}: neither a run directory (no config.yaml) nor a checkpoint (no {CONFIG})")


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


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_listen(cfg: ServeConfig, cluster: ClusterConfig) -> None:
    """Before anything starts: a host other than loopback needs the API key (or serve.allow_public), and a local
    server's port must be free. Ray Serve binds its proxy with SO_REUSEPORT, so a second server on a busy port would
    silently share it (clients' requests split between two models); a plain bind here fails instead. On a cluster
    (an address is set) the proxy listens on the head node, not here: only the key rule applies."""
    import socket

    if cfg.host not in LOOPBACK and not os.environ.get(cfg.api_key_env) and not cfg.allow_public:
        raise UserError(f"serve.host {cfg.host} listens beyond this machine without an API key: set {cfg.api_key_env}, "
                        "or serve.allow_public=true to serve to anyone who can reach it")
    if cluster.address or os.environ.get("RAY_ADDRESS"):
        return
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((cfg.host, cfg.port))
        except OSError as e:
            raise UserError(f"serve.port {cfg.port} on {cfg.host} is in use ({_holder(cfg)}); stop it or choose "
                            f"another --port ({e.strerror})") from None


def _holder(cfg: ServeConfig) -> str:
    """What answers on the port: a raygpt server names its model (when its key is not needed), else a process."""
    import urllib.request

    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else "::1" if cfg.host == "::" else cfg.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            health = json.loads(answer.read(4096))
    except (OSError, ValueError):
        return "by another process"
    if isinstance(health, dict) and "model" in health:
        return f"raygpt serve of {health['model']!r} answers there"
    return "a keyed raygpt server answers there" if health == {"status": "ok"} else "by another process"


def stop() -> None:
    serve.delete(APP)


def serve_forever(target: Target) -> None:
    """`raygpt serve`: connect to Ray, deploy, print where, and keep serving until Ctrl-C / SIGTERM (e.g. `raygpt jobs
    stop`), then take the app down (Serve apps outlive their driver on a cluster)."""
    import signal

    from cluster import ray_connect

    check_listen(target.serve, target.cluster)
    ray_connect.connect(target.cluster)
    ray_connect.require_gpus("serve.num_gpus", target.serve.num_gpus)
    url = start(target.checkpoint, target.serve, target.model_name)
    keyed = " (API key required)" if os.environ.get(target.serve.api_key_env) else ""
    print(f"[serve] {target.model_name} ({target.checkpoint}) at {url}{keyed}; "
          f"{target.serve.min_replicas}-{target.serve.max_replicas} replica(s); Ctrl-C stops", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        done.wait()
    finally:
        stop()
        print("[serve] stopped", flush=True)
