"""The ASGI app of `retlm serve` (FastAPI): OpenAI's completions and chat completions with retrieval, the
database's search, the models list, a health check and the web page.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/search``, ``GET /v1/models``,
``GET /health``, ``GET /`` (the page) and its files under ``/static/``. FastAPI's own documentation pages
are off: they load their scripts from a CDN.

A request is checked completely before it is queued (model name, types, lengths against the context and
the cap), so every bad request gets its 400 at once, whatever the queue holds. The :class:`Guard`
middleware runs before any route: the API key, then the body size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from retlm.serve.backends import Backend, Prompt, Sampling, neighbor_json
from retlm.serve.page import PUBLIC_PATHS, add_page_routes
from retlm.serve.queue import GenerationWorker, Job, QueueFull, ShuttingDown
from retlm.serve.responses import Reply, gather, stream
from retlm.serve.schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    SearchRequest,
    error_body,
    shorten,
    validation_message,
)

logger = logging.getLogger("retlm.serve")

MAX_PROMPTS = 16  # prompts in one completions request


@dataclass
class ServeSettings:
    """How the server treats requests (the CLI's options; defaults for tests and library use).

    ``max_tokens``: the cap on a request's ``max_tokens`` (and the chat default); ``max_batch``: rows one
    forward pass may batch (1: the queue alone, no batching); ``batch_wait``: seconds an idle worker waits
    for more requests to batch with the first; ``max_queue``: requests that may wait;
    ``max_body_bytes``: the largest request body; ``api_key``: required as ``Authorization: Bearer`` on
    every route but ``/health`` and the page's static files; ``shutdown_grace``: seconds running requests
    get to finish once the server is told to stop.
    """

    model_id: str
    max_tokens: int = 512
    max_batch: int = 16
    batch_wait: float = 0.02
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    shutdown_grace: float = 2.0


class Guard:
    """Pure ASGI middleware: the API key (401, before anything else), then a bounded body (413)."""

    def __init__(self, app: Any, settings: ServeSettings):
        self.app = app
        self.key = f"Bearer {settings.api_key}".encode() if settings.api_key else None
        self.limit = settings.max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"] not in PUBLIC_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                message = "Missing or incorrect API key: send it as 'Authorization: Bearer KEY'."
                body = error_body(message, code="invalid_api_key")
                await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
                return
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await _send_json(send, 413, self._too_large())
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await _send_json(send, 413, self._too_large())
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    def _too_large(self) -> dict[str, Any]:
        return error_body(f"The request body is larger than this server accepts ({self.limit} bytes).")


async def _send_json(send: Any, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": data})


class Service:
    """The routes' logic: checks a request against the backend, queues it, answers it."""

    def __init__(self, backend: Backend, settings: ServeSettings):
        self.backend, self.settings = backend, settings
        self.worker = GenerationWorker(
            backend,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            batch_wait=settings.batch_wait,
        )
        self.started = int(time.time())

    # ---- checks
    def check_model(self, name: str) -> None:
        if name != self.settings.model_id:
            raise ApiError(
                f"The model {shorten(name)} does not exist: this server serves {self.settings.model_id!r}.",
                param="model",
                code="model_not_found",
            )

    def encode_prompts(self, prompt: str | list[str] | list[int]) -> list[Prompt]:
        if isinstance(prompt, str):
            texts = [prompt]
        elif prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) > MAX_PROMPTS:
                raise ApiError(
                    f"prompt takes at most {MAX_PROMPTS} strings, got {len(prompt)}", param="prompt"
                )
            texts = list(prompt)  # type: ignore[arg-type]
        else:
            ids = [int(t) for t in prompt]
            vocab = self.backend.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(f"prompt token ids must lie in 0..{vocab - 1}", param="prompt")
            return [Prompt(self.backend.decode(ids), ids)] if ids else self._empty()
        prompts = [Prompt(text, self.backend.encode(text)) for text in texts]
        if any(len(p) == 0 for p in prompts):
            self._empty()
        return prompts

    @staticmethod
    def _empty() -> list[Prompt]:
        raise ApiError("The prompt is empty: give some text.", param="prompt")

    def max_tokens(self, requested: int | None, longest: int, default: int | None, param: str) -> int:
        context, cap = self.backend.context_length, self.settings.max_tokens
        if longest >= context:
            raise ApiError(
                f"This model's maximum context length is {context} tokens, but the prompt has {longest} "
                "tokens: shorten it.",
                param=param,
                code="context_length_exceeded",
            )
        if requested is None:
            return max(1, min(default or cap, cap, context - longest))
        if requested > cap:
            raise ApiError(
                f"max_tokens is at most {cap} on this server, got {requested}.", param="max_tokens"
            )
        if longest + requested > context:
            raise ApiError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{longest + requested} tokens ({longest} in the prompt, {requested} for the completion). "
                "Reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def sampling(self, body: CompletionRequest | ChatCompletionRequest) -> Sampling:
        if body.num_neighbors is not None and self.backend.kind != "none":
            limit = self.backend.max_neighbors
            if body.num_neighbors > limit:
                raise ApiError(
                    f"num_neighbors is at most {limit} here, got {body.num_neighbors}", param="num_neighbors"
                )
        return Sampling(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            retrieval=body.retrieval and self.backend.kind != "none",
            num_neighbors=body.num_neighbors,
        )

    def prepare_completion(
        self, body: CompletionRequest, loop: asyncio.AbstractEventLoop
    ) -> tuple[Job, Reply]:
        self.check_model(body.model)
        body.check_unsupported()
        stops = body.stops()
        prompts = self.encode_prompts(body.prompt)
        longest = max(len(p) for p in prompts)
        max_tokens = self.max_tokens(body.max_tokens, longest, 16, "prompt")  # OpenAI's default: 16
        job = Job(prompts, body.n, max_tokens, stops, self.sampling(body), loop)
        return job, Reply(self.settings.model_id, False, sum(len(p) for p in prompts) * body.n)

    def prepare_chat(self, body: ChatCompletionRequest, loop: asyncio.AbstractEventLoop) -> tuple[Job, Reply]:
        self.check_model(body.model)
        body.check_unsupported()
        stops = body.stops()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = self.backend.chat_prompt(messages)
        prompt = Prompt(text, self.backend.encode(text))
        if len(prompt) == 0:
            raise ApiError("The messages hold no text.", param="messages")
        max_tokens = self.max_tokens(body.requested_max_tokens(), len(prompt), None, "messages")
        job = Job([prompt], body.n, max_tokens, stops, self.sampling(body), loop)
        return job, Reply(self.settings.model_id, True, len(prompt) * body.n)

    # ---- answers
    async def answer(self, request: Request, job: Job, reply: Reply, stream_it: bool, usage: bool) -> Any:
        try:
            self.worker.submit(job)
        except QueueFull:
            raise ApiError(
                f"The server is busy ({self.settings.max_queue} requests are waiting): retry later.",
                status=503,
                kind="server_error",
                code="overloaded",
            ) from None
        except ShuttingDown:
            raise ApiError("The server is shutting down.", status=503, kind="server_error") from None
        if stream_it:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(
                stream(job, reply, usage), media_type="text/event-stream", headers=headers
            )
        outcome = await gather(job, request.is_disconnected)
        if outcome is None:  # the client left; nobody reads this
            return JSONResponse(error_body("client disconnected"), status_code=499)
        if outcome.error is not None:
            status = 503 if outcome.error.reason == "shutdown" else 500
            raise ApiError(outcome.error.text, status=status, kind="server_error")
        return JSONResponse(reply.whole(outcome))

    def models(self) -> dict[str, Any]:
        entry = {
            "id": self.settings.model_id,
            "object": "model",
            "created": self.started,
            "owned_by": "retlm",
            "retlm": self.backend.describe(),
        }
        return {"object": "list", "data": [entry]}


def create_app(backend: Backend, settings: ServeSettings) -> FastAPI:
    """The app serving ``backend``; its worker thread starts with the app and stops with it."""
    service = Service(backend, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        yield
        service.worker.close(0)
        await anyio.to_thread.run_sync(service.worker.join, 5.0)

    app = FastAPI(title="retlm serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(err.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind=kind), status_code=err.status_code)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return service.models()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        job, reply = await _prepare(service.prepare_completion, body)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return await service.answer(request, job, reply, body.stream, usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        job, reply = await _prepare(service.prepare_chat, body)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return await service.answer(request, job, reply, body.stream, usage)

    @app.post("/v1/search")
    async def search(body: SearchRequest) -> dict[str, Any]:
        if backend.kind == "none":
            raise ApiError("This server has no retrieval database.", param="query")
        if body.k > backend.max_neighbors:
            raise ApiError(f"k is at most {backend.max_neighbors} here, got {body.k}", param="k")
        found = await anyio.to_thread.run_sync(backend.search, body.query, body.k)
        data = [{"rank": rank, **neighbor_json(n)} for rank, n in enumerate(found, 1)]
        return {"object": "list", "query": body.query, "data": data}

    add_page_routes(app)
    app.add_middleware(Guard, settings=settings)
    return app


async def _prepare(prepare: Any, body: Any) -> tuple[Job, Reply]:
    """``prepare(body, loop)`` in a thread: a long prompt's tokenization must not stall the event loop; the
    job answers on this loop."""
    return await anyio.to_thread.run_sync(prepare, body, asyncio.get_running_loop())
