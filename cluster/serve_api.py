"""The wire side of `raygpt serve` (cluster/serve.py): OpenAI's completions request and error format, a sequence's
tokens as the text that may be sent, and the bridge between the asyncio handlers and the thread driving the engine.

    python -c "from cluster.serve_api import CompletionRequest; print(CompletionRequest(prompt='hi'))"
"""

import asyncio
import threading
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

MAX_STOP = 4  # OpenAI's limit of stop sequences
MAX_STOP_CHARS = 256
"""The longest stop string: matching costs at most MAX_STOP × MAX_STOP_CHARS character comparisons per token, so it
stays microseconds on the event loop (a thread would not help: matching holds the GIL)."""


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request we implement; others (echo, logprobs, penalties, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    temperature: StrictFloat | StrictInt = Field(default=1.0, ge=0, le=2)
    top_p: StrictFloat | StrictInt = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)
    """What torch's generator takes: a 64-bit value."""
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    """{"include_usage": true}: a last chunk with the token counts (OpenAI's)"""
    n: StrictInt = Field(default=1, ge=1, le=1)

    @property
    def stops(self) -> list[str]:
        """`stop` as a list (it may be one string)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


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
