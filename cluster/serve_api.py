"""The wire side of `raygpt serve` (cluster/serve.py): OpenAI's completions and chat completions requests, their
log-probabilities and streamed chunks, the error format, a sequence's tokens as the text that may be sent, and the
bridge between the asyncio handlers and the thread driving the engine.

    python -c "from cluster.serve_api import CompletionRequest; print(CompletionRequest(prompt='hi'))"
"""

import asyncio
import threading
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from core.chat import ChatError, check_messages, render

MAX_STOP = 4  # OpenAI's limit of stop sequences
MAX_LOGPROBS = 5  # OpenAI's limit of `logprobs` alternatives
MAX_STOP_CHARS = 256
"""The longest stop string: matching costs at most MAX_STOP × MAX_STOP_CHARS character comparisons per token, so it
stays microseconds on the event loop (a thread would not help: matching holds the GIL)."""


class _Sampling(BaseModel):
    """The request fields that completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: StrictFloat | StrictInt = Field(default=1.0, ge=0, le=2)
    top_p: StrictFloat | StrictInt = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)
    """What torch's generator takes: a 64-bit value. With n > 1, choice j samples with seed + j."""
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    """{"include_usage": true}: a last chunk with the token counts (OpenAI's)"""
    n: StrictInt = Field(default=1, ge=1)
    """Choices per prompt (at most serve.max_batch, checked by the server)."""

    @property
    def stops(self) -> list[str]:
        """`stop` as a list (it may be one string)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """The fields of OpenAI's completions request we implement; others (penalties, best_of, ...) are ignored."""

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = Field(default=16, ge=0)
    """0 only with `echo` (the prompt's log-probabilities, nothing generated)"""
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Each token's log-probability and the k most likely alternatives (OpenAI's limit: 5)."""
    echo: StrictBool = False
    """The prompt comes back before the completion, in the text and (with `logprobs`) with its log-probabilities."""


class ChatRequest(_Sampling):
    """OpenAI's chat completions request: a conversation formatted with the checkpoint's chat template."""

    messages: list[Any] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    """OpenAI's newer name for max_tokens; either may be given (default: the rest of the context)."""


def logprobs_json(tokenizer: Any, ids: list[int], entries: list[tuple[float, tuple[tuple[int, float], ...]] | None],
                  k: int) -> dict[str, Any]:
    """The completions API's `logprobs` object for tokens `ids` with their (log p, top-k) entries (None: the first
    prompt token, which has no context): tokens as text, their log-probabilities, the top k as {token: log p}, and
    each token's character offset in the returned text."""
    tokens = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    offsets = [0]
    for token in tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    top = [None if e is None else {tokenizer.decode([i], skip_special_tokens=False): lp for i, lp in e[1][:k]}
           for e in entries]
    return {"tokens": tokens, "token_logprobs": [None if e is None else e[0] for e in entries],
            "top_logprobs": top, "text_offset": offsets}


def chat_prompt(template: str | None, messages: list[Any]) -> str:
    """The conversation as the model's prompt text, ending where the assistant's turn begins; a BadRequest when the
    checkpoint has no chat template or a message is malformed."""
    if template is None:
        raise BadRequest(400, "this model has no chat template (its tokenizer has no <|im_start|>/<|im_end|> and its "
                              "checkpoint names none); use /v1/completions", "messages", "no_chat_template")
    try:
        return render(template, check_messages(messages), add_generation_prompt=True)
    except ChatError as e:
        raise BadRequest(400, str(e), "messages") from None


def choice_chunk(chat: bool, index: int, piece: str, finish: str | None) -> dict[str, Any]:
    """One streamed choice: completions' {text} or chat's {delta}."""
    if chat:
        return {"index": index, "delta": {"content": piece} if piece else {}, "logprobs": None, "finish_reason": finish}
    return {"text": piece, "index": index, "logprobs": None, "finish_reason": finish}


class BadRequest(Exception):
    """An error the client caused: the status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        body = {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def validation_message(error: ValidationError) -> tuple[str, str]:
    """One line naming the first bad field, and the field."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("str", "list", "int", "float")))
    return f"{field or 'body'}: {first['msg']}", field.split(".")[0] or "body"


class TextStream:
    """A sequence's tokens as text: what may be sent so far (whole characters, and nothing that could still become a
    stop string), and whether a stop string ended it."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop, self.ids, self.sent, self.text = tokenizer, stop, [], 0, ""
        self.stopped = False

    def add(self, token: int) -> str:
        """Take a token; return the new text that is safe to send."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character not complete yet
            return ""
        self.text = text
        for stop in self.stop:  # only the new end can hold a stop: what was sent had none
            if (at := text.find(stop, max(0, self.sent - len(stop)))) != -1:
                self.text, self.stopped = text[:at], True
                text = self.text
        safe = len(self.text) if self.stopped else len(self.text) - self._held_back()
        piece = self.text[self.sent : max(safe, self.sent)]
        self.sent += len(piece)
        return piece

    def rest(self) -> str:
        """The text not sent yet (at the end)."""
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece

    def _held_back(self) -> int:
        """Characters at the end that begin a stop string: not sent until it is clear they do not end the text."""
        tail = self.text[-MAX_STOP_CHARS:]
        return max((k for stop in self.stop for k in range(1, len(stop)) if tail.endswith(stop[:k])), default=0)


class EngineLoop:
    """A `model.batching.Engine` driven by one thread; asyncio callers get their events through queues. `lock` makes
    adding a request and registering its queue one step for the thread that hands out events, so no event can come
    before its queue exists."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.queues, self.wake, self.lock = engine, {}, threading.Event(), threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(target=self._run, name="raygpt-engine", daemon=True).start()

    def submit(self, request: Any) -> tuple[int, asyncio.Queue]:
        self.loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            id = self.engine.add(request)  # ValueError: the request cannot run on this model
            self.queues[id] = queue
        self.wake.set()
        return id, queue

    def cancel(self, id: int) -> None:
        with self.lock:
            known = self.queues.pop(id, None) is not None
        if known:
            self.engine.cancel(id)
            self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            while not self.engine.idle:
                try:
                    events = self.engine.step()
                except Exception as error:  # e.g. out of memory: the requests in the batch fail, the replica lives
                    print(f"[serve] a decoding step failed ({type(error).__name__}: {error}); its requests end with "
                          "an error", flush=True)
                    events = self.engine.drop_all()
                with self.lock:
                    for event in events:
                        queue = self.queues.get(event.id)
                        if queue is not None and self.loop is not None:
                            self.loop.call_soon_threadsafe(queue.put_nowait, event)
