"""The request bodies `retlm serve` accepts (OpenAI's schema plus a few retrieval fields), and its errors.

Every body is checked strictly: a wrong type is an error (``"5"`` is not a number), an unknown field is an
error (as OpenAI's API answers), and OpenAI fields this server does not implement are accepted only with
their neutral value (``logprobs: null``, ``presence_penalty: 0``, ...), so a client that sends defaults
works and one that relies on them is told. Errors are OpenAI's shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Extra request fields (vLLM names them the same way): ``retrieval`` (false: the model without retrieved
text), ``num_neighbors``, ``top_k``, ``repetition_penalty``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 16
MAX_NEIGHBORS = 16  # neighbors read per retrieval, at most


class ApiError(Exception):
    """An error answered as OpenAI does: ``status`` and the ``error`` object's fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict[str, Any]:
        return error_body(self.message, kind=self.kind, param=self.param, code=self.code)


def error_body(
    message: str, *, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def shorten(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (error messages never echo unbounded input)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """The fields completions and chat completions share."""

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # accepted with their neutral value only (see the module docstring)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    # retlm's extra fields
    retrieval: bool = True
    num_neighbors: int | None = Field(None, ge=1, le=MAX_NEIGHBORS)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise ApiError(f"stop takes at most {MAX_STOP} sequences, got {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise ApiError("stop sequences must not be empty", param="stop")
        if any(len(s) > 256 for s in stops):
            raise ApiError("stop sequences must be at most 256 characters", param="stop")
        return stops

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs"):
            given = getattr(self, name)
            neutral = (
                given is None or given is False or given == {} or (name.endswith("penalty") and given == 0)
            )
            if not neutral:
                raise ApiError(
                    f"{name} is not supported by this server (got {shorten(given)})",
                    param=name,
                    code="unsupported",
                )
        if self.stream_options is not None and not self.stream:
            raise ApiError("stream_options is only allowed when stream is true", param="stream_options")


class CompletionRequest(_Generation):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, or a list of token ids."""

    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise ApiError("echo is not supported by this server", param="echo", code="unsupported")
        if self.best_of not in (None, 1):
            raise ApiError("best_of is not supported by this server", param="best_of", code="unsupported")
        if self.suffix:
            raise ApiError("suffix is not supported by this server", param="suffix", code="unsupported")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``: the messages go through the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ApiError(
                "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens"
            )
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class SearchRequest(_Strict):
    """``POST /v1/search``: the database's ``k`` nearest chunks of ``query``."""

    query: str = Field(min_length=1, max_length=4000)
    k: int = Field(4, ge=1, le=100)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The first of pydantic's (or FastAPI's) errors as one line and the field it is about."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind in ("json_invalid", "json_type"):
        return "We could not parse the JSON body of your request: send a JSON object.", None
    if kind == "model_attributes_type" or (not loc and kind.endswith("_type")):
        return "The request body must be a JSON object.", None
    # unions report one error per member: name the field, not pydantic's member tags
    field = ".".join(p for p in loc if not _union_tag(p))
    if kind == "missing":
        return f"Missing required parameter: '{field}'.", field
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {field}", field
    return f"Invalid value for '{field}': {first.get('msg', 'invalid')}.", field


def _union_tag(part: str) -> bool:
    """Whether a part of an error location is pydantic's name for a union member (``str``, ``list[int]``)."""
    return part in ("str", "int", "float", "bool") or part.startswith(
        ("list[", "dict[", "function-", "literal[")
    )
