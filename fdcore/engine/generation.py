"""``/v1/completions`` and ``/v1/chat/completions``: validate, submit, answer or stream."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from fdcore.engine.disagg.info import DISAGG_KEY, DisaggInfoError, parse_disagg_info
from fdcore.engine.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    choice,
    envelope,
    parse_request,
    sse,
    usage,
)
from fdcore.engine.responses import EventStreamResponse
from fdcore.engine.serving import RequestStream
from fdcore.http import (
    APIError,
    BadRequestId,
    check_request_id,
    error_event,
    json_response,
    read_body,
    until_disconnect,
)
from fdcore.types import EngineRequest, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from fdcore.engine.engine import Engine

_ERROR_TYPES = {
    400: "invalid_request_error",
    503: "service_unavailable_error",
    500: "internal_server_error",
}



def _request_id(from_body: str | None, from_header: str | None) -> str:
    """The body's ``request_id``, else ``X-Request-Id``, else a new one; both are echoed in
    response headers, so an id that could break a header is a 400."""
    for value, where in ((from_body, "request_id"), (from_header, "x-request-id")):
        if value is not None:
            try:
                return check_request_id(value, where)
            except BadRequestId as exc:
                raise APIError(400, str(exc), param=where, code="invalid_value") from None
    return uuid.uuid4().hex

async def completions(request: Request) -> Response:
    """``POST /v1/completions``."""
    return await _generate(request, chat=False)


async def chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``."""
    return await _generate(request, chat=True)


async def _generate(request: Request, chat: bool) -> Response:
    ctx: Engine = request.app.state.engine
    body = await read_body(request.scope, request.receive, ctx.max_body_bytes)
    parsed: CompletionRequest | ChatCompletionRequest
    if chat:
        parsed = parse_request(ChatCompletionRequest, body)
        prompt_ids = _chat_prompt(ctx, parsed)
        requested = parsed.max_completion_tokens or parsed.max_tokens
        param = "messages"
    else:
        parsed = parse_request(CompletionRequest, body)
        prompt_ids = _completion_prompt(ctx, parsed)
        requested = parsed.max_tokens
        param = "prompt"
    if parsed.model is not None and parsed.model not in ctx.served_names:
        raise APIError(400, f"the model `{parsed.model}` does not exist; this engine serves "
                       f"`{ctx.model_name}`", param="model", code="model_not_found")
    max_tokens = _max_tokens(ctx, len(prompt_ids), requested, param)
    rid = _request_id(parsed.request_id, request.headers.get("x-request-id"))
    extra = _disaggregation(ctx, parsed.disaggregate_info)
    engine_request = EngineRequest(
        request_id=rid,
        prompt_token_ids=prompt_ids,
        sampling=SamplingParams(
            max_tokens=max_tokens,
            temperature=parsed.temperature,
            top_p=parsed.top_p,
            top_k=max(parsed.top_k, 0),
            seed=parsed.seed,
            stop=parsed.stop_strings(),
            stop_token_ids=parsed.stop_token_ids or [],
            ignore_eos=parsed.ignore_eos,
        ),
        arrival_time=time.time(),
        origin=ctx.instance_id,
        extra=extra,
    )
    stream = await ctx.serving.submit(engine_request)
    headers = {"x-request-id": rid}
    meta = (chat, rid, ctx.model_name, int(time.time()))
    if parsed.stream:
        events = _events(stream, meta, parsed.include_usage)
        return EventStreamResponse(events, lambda: ctx.serving.cancel(rid), headers)
    # A client that leaves raises ClientGone, which the app answers 499 to nobody.
    text, last = await until_disconnect(
        request.receive, _collect(stream), lambda: ctx.serving.cancel(rid)
    )
    if last.error is not None:
        raise APIError(last.error_code or 500, last.error,
                       _ERROR_TYPES.get(last.error_code, "server_error"), code="engine_error")
    body_json = envelope(
        chat, False, rid, ctx.model_name, meta[3],
        choices=[choice(chat, text, last.finish_reason, stream=False)],
        usage=usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens),
    )
    return json_response(body_json, headers=headers)


def _disaggregation(ctx: Engine, value: dict[str, Any] | None) -> dict[str, Any]:
    """``extra`` for a request's ``disaggregate_info``: kept (checked) on a prefill or decode
    engine, ignored on a mixed one (it runs the whole request)."""
    if value is None or ctx.pd is None:
        return {}
    try:
        info = parse_disagg_info(value)
    except DisaggInfoError as exc:
        raise APIError(400, str(exc), param=DISAGG_KEY, code="invalid_value") from None
    if info.transfer_protocol not in ctx.pd.transports:
        raise APIError(400, f"disaggregate_info.transfer_protocol: this engine does not offer "
                       f"{info.transfer_protocol} (it offers {', '.join(ctx.pd.transports)})",
                       param=DISAGG_KEY, code="invalid_value")
    return {DISAGG_KEY: info.as_dict()}


def _completion_prompt(ctx: Engine, parsed: CompletionRequest) -> list[int]:
    prompt = parsed.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt",
                           code="invalid_value")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if isinstance(prompt, str):
        ids = ctx.tokenizer.encode(prompt)
    else:
        ids = [t for t in prompt if isinstance(t, int)]
        if any(not 0 <= t < ctx.vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {ctx.vocab_size})",
                           param="prompt", code="invalid_value")
    return ids


def _chat_prompt(ctx: Engine, parsed: ChatCompletionRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in parsed.messages]
    text = ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # The template already holds any BOS the model wants.
    return ctx.tokenizer.encode(text, add_special_tokens=False)


def _max_tokens(ctx: Engine, prompt_len: int, requested: int | None, param: str) -> int:
    limit = min(ctx.max_model_len, ctx.cache_tokens)
    if prompt_len >= limit:
        raise APIError(400, f"the prompt is {prompt_len} tokens; this engine takes at most "
                       f"{limit - 1} (context {ctx.max_model_len}, KV cache {ctx.cache_tokens})",
                       param=param, code="context_length_exceeded")
    if requested is None:
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise APIError(400, f"max_tokens is too large: {prompt_len} prompt tokens + {requested} "
                       f"exceed the limit of {limit} tokens", param="max_tokens",
                       code="context_length_exceeded")
    return requested


async def _collect(stream: RequestStream) -> tuple[str, RequestOutput]:
    parts: list[str] = []
    async for output in stream:
        parts.append(output.text)
        last = output
    return "".join(parts), last


async def _events(
    stream: RequestStream, meta: tuple[bool, str, str, int], include_usage: bool
) -> AsyncIterator[bytes]:
    chat = meta[0]

    def chunk(**fields: Any) -> bytes:
        extra = {"usage": None} if include_usage else {}
        return sse(envelope(chat, True, *meta[1:], **{**extra, **fields}))

    if chat:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""},
                 "logprobs": None, "finish_reason": None}
        yield chunk(choices=[first])
    last: RequestOutput | None = None
    async for output in stream:
        last = output
        if output.error is not None:
            yield error_event(output.error_code or 500, output.error,
                              _ERROR_TYPES.get(output.error_code, "server_error"), "engine_error")
            break
        if output.text or output.finished:
            yield chunk(choices=[choice(chat, output.text, output.finish_reason, stream=True)])
    if include_usage and last is not None:
        yield chunk(choices=[], usage=usage(last.prompt_tokens, last.completion_tokens,
                                            last.cached_tokens))
    yield sse("[DONE]")
