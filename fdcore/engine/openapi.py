"""The engine's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Request bodies come from the pydantic models the handlers validate with, so the document cannot
drift from what the engine accepts; the router's document (:mod:`fdcore.router.openapi`) reuses
the same pieces for the endpoints it proxies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from fdcore.engine.openai_protocol import ChatCompletionRequest, CompletionRequest
from fdcore.http import MAX_REQUEST_ID, REQUEST_ID_RULE, json_response

if TYPE_CHECKING:  # the router uses this module too, and needs no engine parts
    from fdcore.engine.engine import Engine

REF = "#/components/schemas/{model}"
# fdcore.http's rule as a JSON Schema pattern: visible ASCII, no space.
REQUEST_ID_PATTERN = f"^[!-~]{{1,{MAX_REQUEST_ID}}}$"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "OpenAI's error shape.",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "integer", "null"]},
        },
    }},
}
_ERROR_MEANINGS = {
    400: "malformed JSON, a field of the wrong type or out of range, a bad request id",
    401: "missing or wrong API key",
    403: "not allowed",
    404: "unknown path, or the thing named is not known",
    409: "a request id that is still in flight",
    413: "body larger than the limit",
    429: "too many requests in flight",
    502: "the instances could not be reached",
    503: "no capacity (or no healthy instance) to serve it now",
    504: "no answer in time",
}
# /metrics, /health and /openapi.json answer text or JSON the document describes loosely.
ANY_JSON: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
TEXT = {"text/plain": {"schema": {"type": "string"}}}


def errors(*statuses: int) -> dict[str, Any]:
    """The ``responses`` entries for these error statuses, each with the OpenAI error body."""
    return {
        str(status): {
            "description": _ERROR_MEANINGS[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for status in statuses
    }


def operation(
    summary: str, ok: dict[str, Any], *error_statuses: int, body: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One operation object: a 200 with ``ok`` content, then the documented errors."""
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "success", "content": ok}, **errors(*error_statuses)},
    }
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body}}}
    if parameters:
        op["parameters"] = parameters
    return op


REQUEST_ID_HEADER: dict[str, Any] = {
    "name": "X-Request-Id", "in": "header", "required": False,
    "description": f"the request's id when the body has none: {REQUEST_ID_RULE}",
    "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
}
ABORT_BODY: dict[str, Any] = {
    "type": "object",
    "description": "``req_ids`` or ``abort_all: true``.",
    "properties": {
        "req_ids": {"type": "array", "items": {"type": "string"}},
        "abort_all": {"type": "boolean"},
    },
}


def request_schemas(served_names: Sequence[str] = (), vocab_size: int = 0) -> dict[str, Any]:
    """``components.schemas`` for the two inference bodies and every model they use.

    An engine knows what it serves: ``served_names`` narrows ``model`` to them and
    ``vocab_size`` bounds prompt token ids (the router, which does not know, passes neither).
    """
    _, top = models_json_schema(
        [(ChatCompletionRequest, "validation"), (CompletionRequest, "validation")],
        ref_template=REF,
    )
    schemas: dict[str, Any] = top["$defs"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        fields = schemas[name]["properties"]
        # The field allows any string of the right length; fdcore.http narrows it.
        fields["request_id"] = {
            "anyOf": [{"type": "string", "pattern": REQUEST_ID_PATTERN}, {"type": "null"}],
            "default": None, "description": REQUEST_ID_RULE,
        }
        if served_names:
            fields["model"] = {"anyOf": [{"enum": sorted(served_names)}, {"type": "null"}],
                               "default": None}
    schemas["CompletionRequest"]["properties"]["prompt"] = _prompt(vocab_size)
    return {**schemas, "Error": ERROR_SCHEMA}


def _prompt(vocab_size: int) -> dict[str, Any]:
    token: dict[str, Any] = {"type": "integer", "minimum": 0}
    if vocab_size:
        token["maximum"] = vocab_size - 1
    ids = {"type": "array", "items": token, "minItems": 1}
    text = {"type": "string", "minLength": 1}
    return {"description": "a string, a list of token ids, or a one-element list of either",
            "anyOf": [text, ids, {"type": "array", "items": text, "minItems": 1, "maxItems": 1},
                      {"type": "array", "items": ids, "minItems": 1, "maxItems": 1}]}


def inference_paths(*error_statuses: int) -> dict[str, Any]:
    """``paths`` entries for ``/v1/chat/completions`` and ``/v1/completions``."""
    stream = {"application/json": {"schema": {"type": "object"}},
              "text/event-stream": {"schema": {  # each event: data is a JSON chunk or [DONE]
                  "type": "object", "properties": {"data": {"type": "string"}}}}}
    return {
        path: {"post": operation(
            summary, stream, *error_statuses,
            body={"$ref": REF.format(model=model)}, parameters=[REQUEST_ID_HEADER],
        )}
        for path, model, summary in (
            ("/v1/chat/completions", "ChatCompletionRequest", "a chat completion"),
            ("/v1/completions", "CompletionRequest", "a text completion"),
        )
    }


def document(title: str, paths: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI 3.1 document around ``paths`` and the component ``schemas``."""
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def engine_document(served_names: Sequence[str] = (), vocab_size: int = 0) -> dict[str, Any]:
    """The engine's document: every route of :func:`fdcore.engine.app.build_app`."""
    return document("fdcore engine", {
        **inference_paths(400, 409, 413, 429, 503),
        "/v1/models": {"get": operation("the served model", ANY_JSON)},
        "/v1/abort_requests": {"post": operation(
            "abort requests by id, or all", ANY_JSON, 400, 413, body=ABORT_BODY,
        )},
        "/health": {"get": operation("200 while serving", ANY_JSON, 503)},
        "/metrics": {"get": operation("Prometheus text", TEXT)},
        "/openapi.json": {"get": operation("this document", ANY_JSON)},
    }, request_schemas(served_names, vocab_size))


async def openapi(request: Request) -> Response:
    """``GET /openapi.json``: the engine's OpenAPI document, for the model it serves."""
    ctx: Engine = request.app.state.engine
    return json_response(engine_document(sorted(ctx.served_names), ctx.vocab_size))
