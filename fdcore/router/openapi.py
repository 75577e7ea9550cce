"""The router's OpenAPI 3.1 document, served at ``GET /openapi.json``.

The inference bodies are the engine's request models (:mod:`fdcore.engine.openapi`): the router
forwards them unchanged, so the instance's validation is what a client meets.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from fdcore.engine.openapi import (
    ABORT_BODY,
    ANY_JSON,
    TEXT,
    document,
    errors,
    inference_paths,
    operation,
    request_schemas,
)
from fdcore.http import json_response

_PORT: dict[str, Any] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535},
                                   {"type": "string", "pattern": "^[1-9][0-9]{0,4}$"}]}
_LIST: dict[str, Any] = {"anyOf": [
    {"type": "array", "items": {"type": ["integer", "string"]}},
    {"type": "string", "description": "comma-separated"},
]}
REGISTER_BODY: dict[str, Any] = {
    "type": "object",
    "description": "FastDeploy's InstanceInfo; fields fdcore does not use are kept.",
    "required": ["role", "host_ip", "port"],
    "properties": {
        "role": {"anyOf": [{"type": "string", "enum": ["mixed", "prefill", "decode"]},
                           {"type": "integer", "enum": [0, 1, 2]}],
                 "description": "mixed | prefill | decode (any case), or 0 | 1 | 2"},
        "host_ip": {"type": "string", "description": "an IP address or host name",
                    "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}, {"format": "hostname"}]},
        "port": _PORT,
        "metrics_port": _PORT,
        "connector_port": _PORT,
        "engine_worker_queue_port": _PORT,
        "transfer_protocol": {"anyOf": [
            {"type": "array", "items": {"type": "string", "enum": ["ipc", "rdma", "tcp"]}},
            {"type": "string", "description": "comma-separated"},
        ]},
        "rdma_ports": _LIST,
        "device_ids": _LIST,
    },
}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def _guarded(op: dict[str, Any]) -> dict[str, Any]:
    # Keys are optional (auth:); once configured these paths answer 401 without one.
    return {**op, "security": _BEARER, "responses": {**op["responses"], **errors(401)}}


def router_document() -> dict[str, Any]:
    """The router's document: every route of :func:`fdcore.router.app.create_app`."""
    paths = {
        path: {"post": _guarded(item["post"])}
        for path, item in inference_paths(400, 404, 413, 429, 502, 503, 504).items()
    }
    admin = {
        ("post", "/v1/abort_requests"): operation(
            "abort requests by id, or all, on the instances", ANY_JSON, 400, 413,
            body=ABORT_BODY),
        ("post", "/register"): operation(
            "add an instance, or refresh it (a heartbeat)", ANY_JSON, 400, 403, 409, 413, 503,
            body=REGISTER_BODY),
        ("post", "/deregister"): operation(
            "forget an instance", ANY_JSON, 400, 404, 413, body=REGISTER_BODY),
        ("get", "/registered"): operation("every instance by role", ANY_JSON),
        ("get", "/registered_number"): operation("how many instances of each role", ANY_JSON),
        ("get", "/health_generate"): operation(
            "check every instance now; 503 unless the router can serve", ANY_JSON, 503),
    }
    paths.update({path: {method: _guarded(op)} for (method, path), op in admin.items()})
    paths["/v1/models"] = {"get": _guarded(operation(
        "the union of the healthy instances' models", ANY_JSON))}
    paths["/health"] = {"get": operation("the router itself", ANY_JSON)}
    paths["/metrics"] = {"get": operation("Prometheus text", TEXT)}
    paths["/openapi.json"] = {"get": operation("this document", ANY_JSON)}
    doc = document("fdcore router", paths, request_schemas())
    doc["components"]["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "an API key (inference) or the admin key (the rest); X-Admin-Key too",
    }}
    return doc


async def openapi(request: Request) -> Response:
    """``GET /openapi.json``: the router's OpenAPI document."""
    return json_response(router_document())
