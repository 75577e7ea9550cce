"""OpenAI request models, their validation, and the response shapes."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fdcore.http import APIError, parse_json


class StreamOptions(BaseModel):
    """``stream_options``."""

    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


# The sampler works in float32: a temperature or top_p this small rounds to 0 there (or
# overflows the scaled logits), the probabilities become NaN, and the failed step fails every
# request in the batch. Below it a temperature means greedy and top_p keeps the top token
# (vLLM's _SAMPLING_EPS rule).
SAMPLING_EPS = 1e-5


class _Request(BaseModel):
    # Strict types (a string is no number), unknown OpenAI fields ignored.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    request_id: str | None = Field(None, min_length=1, max_length=256)
    # A P-D pairing, checked by fdcore.engine.disagg.info where the engine hands off.
    disaggregate_info: dict[str, Any] | None = None

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, value: float) -> float:
        return 0.0 if value < SAMPLING_EPS else value

    @field_validator("top_p")
    @classmethod
    def _tiny_top_p_keeps_the_top_token(cls, value: float) -> float:
        return max(value, SAMPLING_EPS)

    def stop_strings(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False


class TextPart(BaseModel):
    """A ``{"type": "text", "text": ...}`` content part."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; content parts are joined into one string."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


RequestT = TypeVar("RequestT", bound=_Request)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def parse_request(model: type[RequestT], body: bytes) -> RequestT:
    """Decode and validate a JSON body; every failure is a 400 naming the problem."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or None
        raise APIError(400, f"{param}: {err['msg']}", param=param, code="invalid_value") from None
    if request.n != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")
    return request


def _is_union_tag(part: str | int) -> bool:
    # pydantic names the union member that failed ("str", "list[int]") inside the location.
    return isinstance(part, str) and (part in _SCALAR_TAGS or "[" in part)


_SCALAR_TAGS = frozenset({"str", "int", "float", "bool", "none"})


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's ``usage`` object, with the prefix-cache hit in ``prompt_tokens_details``."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def choice(chat: bool, text: str, finish_reason: str | None, stream: bool) -> dict[str, Any]:
    """One ``choices[]`` entry of a response or stream chunk."""
    entry: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
    if not chat:
        entry["text"] = text
    elif stream:
        entry["delta"] = {"content": text} if text or finish_reason is None else {}
    else:
        entry["message"] = {"role": "assistant", "content": text}
    return entry


def envelope(
    chat: bool, stream: bool, request_id: str, model: str, created: int, **fields: Any
) -> dict[str, Any]:
    """The fields every response and chunk carries (``id``, ``object``, ``created``, ``model``)."""
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    prefix = "chatcmpl" if chat else "cmpl"
    return {
        "id": f"{prefix}-{request_id}",
        "object": kind,
        "created": created,
        "model": model,
        **fields,
    }


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: {...}\\n\\n``."""
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"
