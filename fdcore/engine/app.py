"""The engine's Starlette apps: routes and error handlers over one running
:class:`~fdcore.engine.engine.Engine` (``app.state.engine``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from fdcore.engine.generation import chat_completions, completions
from fdcore.engine.openapi import openapi
from fdcore.http import APIError, error_response, json_response, parse_json, read_body

if TYPE_CHECKING:
    from fdcore.engine.engine import Engine

log = structlog.get_logger(__name__)


async def models(request: Request) -> Response:
    """``GET /v1/models``: the one served model."""
    ctx: Engine = request.app.state.engine
    card = {"id": ctx.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "fdcore", "max_model_len": ctx.max_model_len}
    return json_response({"object": "list", "data": [card]})


async def health(request: Request) -> Response:
    """``GET /health``: 200 once the engine serves; 503 while its scheduler reports a problem,
    and 503 ``draining`` once SIGTERM has begun a drain (so routers stop sending).

    The problem is the scheduler's ``health()`` (e.g. ``global``: Redis unreachable).
    """
    ctx: Engine = request.app.state.engine
    if ctx.drain.draining:
        return json_response({"status": "draining"}, 503)
    problem = ctx.scheduler.health()
    if problem:
        return json_response({"status": "unhealthy", "detail": problem}, 503)
    return json_response({"status": "ok"})


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format."""
    ctx: Engine = request.app.state.engine
    queued = await ctx.scheduler.get_unhandled_request_num()
    ctx.metrics.num_requests_waiting.set(queued + len(ctx.serving.engine.batcher.waiting))
    return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def abort_requests(request: Request) -> Response:
    """``POST /v1/abort_requests``: ``{"req_ids": [...]}`` or ``{"abort_all": true}``."""
    ctx: Engine = request.app.state.engine
    body = parse_json(await read_body(request.scope, request.receive, ctx.max_body_bytes))
    body = body if isinstance(body, dict) else {}
    ids = body.get("req_ids")
    if body.get("abort_all") is True:
        ids = ctx.serving.active_ids()
    elif not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise APIError(400, "must provide abort_all=true or req_ids (a list of strings)",
                       param="req_ids", code="invalid_value")
    aborted, not_found = await ctx.serving.abort(ids)
    return json_response({"result": {"aborted": aborted, "not_found": not_found}})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail),
                          code="not_found" if exc.status_code == 404 else None,
                          headers=dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("engine.request_failed", path=request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                          "internal_server_error")


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client left (or the HTTP server dropped a body it could not parse) before its
    # answer: nobody reads one, and it is no engine failure to log.
    return Response(status_code=499)


_HANDLERS: dict[Any, Any] = {
    APIError: _api_error,
    ClientDisconnect: _client_gone,
    HTTPException: _http_error,
    Exception: _internal_error,
}


def build_app(engine: Engine) -> Starlette:
    """The API app over ``engine``; the server starts and stops the engine around it."""
    return _app(engine, [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/abort_requests", abort_requests, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ])


def build_metrics_app(engine: Engine) -> Starlette:
    """``/metrics`` alone, for a ``--metrics-port`` apart from the API port."""
    return _app(engine, [Route("/metrics", metrics, methods=["GET"])])


def _app(engine: Engine, routes: list[Route]) -> Starlette:
    app = Starlette(routes=routes, exception_handlers=_HANDLERS)
    # Redirecting /health/ to /health would echo the client's Host header into Location.
    app.router.redirect_slashes = False
    app.state.engine = engine
    return app
