"""OpenAI's response shapes for completions and chat completions, whole or streamed as server-sent
events, each with retlm's extra top-level ``retrieval`` field.

``retrieval`` is a list of retrieval steps, each::

    {"index": 0,                 # the choice it belongs to
     "source": "prompt",         # the searched tokens lie in the prompt, or "completion"
     "token_offset": 64,         # tokens of prompt + completion before the model reads these neighbors
     "text_offset": 0,           # characters of the completion generated before it reads them
     "query": "...",             # the text that was searched
     "neighbors": [{"doc_name": "...", "doc_id": 3, "chunk_id": 41, "score": 0.71, "text": "..."}]}

A streamed response sends each step when it is made, in a chunk whose ``choices`` list is empty (as
OpenAI's usage chunk is), so a client sees which passages were read before the text that follows them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from retlm.serve.queue import Event, Job
from retlm.serve.schema import error_body

KEEP_ALIVE_SECONDS = 2.0  # an SSE comment while a streamed request waits: a gone client shows up sooner


@dataclass
class Outcome:
    """What a job produced, gathered from its events."""

    rows: int
    texts: list[str] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    retrieval: list[dict[str, Any]] = field(default_factory=list)
    error: Event | None = None

    def __post_init__(self) -> None:
        self.texts = [""] * self.rows
        self.reasons = [None] * self.rows
        self.tokens = [0] * self.rows

    def add(self, event: Event) -> None:
        if event.kind == "text":
            self.texts[event.index] += event.text
        elif event.kind == "retrieval":
            self.retrieval.append(event.step or {})
        elif event.kind == "finish":
            self.reasons[event.index], self.tokens[event.index] = event.reason, event.tokens
        elif event.kind == "error":
            self.error = event


class Reply:
    """The identity of one response (id, creation time, model, chat or not) and its JSON shapes."""

    def __init__(self, model_id: str, chat: bool, prompt_tokens: int):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model_id
        self.prompt_tokens = prompt_tokens

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
        return {
            "id": self.id,
            "object": kind if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
        }

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def whole(self, outcome: Outcome) -> dict[str, Any]:
        choices = []
        for index, (text, reason) in enumerate(zip(outcome.texts, outcome.reasons, strict=True)):
            reason = reason or "length"
            if self.chat:
                message = {"role": "assistant", "content": text}
                choices.append(
                    {"index": index, "message": message, "logprobs": None, "finish_reason": reason}
                )
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": reason})
        return {
            **self._head(False),
            "choices": choices,
            "usage": self.usage(sum(outcome.tokens)),
            "retrieval": outcome.retrieval,
        }

    def chunk(
        self, index: int, text: str | None = None, reason: str | None = None, role: bool = False
    ) -> dict:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return {**self._head(True), "choices": [choice]}

    def extra_chunk(self, **fields: Any) -> dict[str, Any]:
        return {**self._head(True), "choices": [], **fields}


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def stream(job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
    """The job's events as OpenAI's stream: text chunks, retrieval chunks, a finish chunk per choice, the
    usage chunk when asked, then ``data: [DONE]``. Closing the stream early cancels the job."""
    tokens = 0
    started: set[int] = set()
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), KEEP_ALIVE_SECONDS)
            except asyncio.TimeoutError:  # noqa: UP041 (a different class before Python 3.11)
                yield b": keep-alive\n\n"
                continue
            if event.kind == "end":
                break
            if event.kind == "error":
                yield sse(error_body(event.text, kind="server_error"))
                continue
            if event.kind == "retrieval":
                yield sse(reply.extra_chunk(retrieval=[event.step]))
                continue
            first = reply.chat and event.index not in started
            started.add(event.index)
            if event.kind == "text":
                yield sse(reply.chunk(event.index, event.text, role=first))
            elif event.kind == "finish":
                tokens += event.tokens
                if first:
                    yield sse(reply.chunk(event.index, "", role=True))
                yield sse(reply.chunk(event.index, reason=event.reason))
        if include_usage:
            yield sse(reply.extra_chunk(usage=reply.usage(tokens)))
        yield sse("[DONE]")
    finally:
        job.cancel()  # a no-op when the job ended; frees the model when the client went away


async def gather(job: Job, is_disconnected: Any, every: float = 0.25) -> Outcome | None:
    """Every event of ``job``; None (and the job cancelled) if the client disconnects first, which is
    checked every ``every`` seconds whether events arrive or not."""
    outcome = Outcome(job.rows)
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), every)
            except asyncio.TimeoutError:  # noqa: UP041 (a different class before Python 3.11)
                event = None
            if event is not None and event.kind == "end":
                return outcome
            if event is not None:
                outcome.add(event)
            if loop.time() - checked >= every:
                checked = loop.time()
                if await is_disconnected():
                    return None
    finally:
        job.cancel()
