"""The engine's Starlette app: routes, error handlers and the start-up/shut-down lifespan."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import orjson
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from fdcore.engine.context import EngineContext
from fdcore.engine.generation import chat_completions, completions
from fdcore.engine.openai_protocol import APIError
from fdcore.engine.openapi import openapi
from fdcore.engine.responses import json_response, read_body

log = structlog.get_logger(__name__)


class Component(Protocol):
    """Something with a start and a stop (scheduler, engine loop, serving, registrar)."""

    async def start(self) -> None:
        """Start background work."""

    async def stop(self) -> None:
        """Stop background work."""


async def models(request: Request) -> Response:
    """``GET /v1/models``: the one served model."""
    ctx: EngineContext = request.app.state.engine
    card = {"id": ctx.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "fdcore", "max_model_len": ctx.max_model_len}
    return json_response({"object": "list", "data": [card]})


async def health(request: Request) -> Response:
    """``GET /health``: 200 once the engine serves; 503 while its scheduler reports a problem,
    and 503 ``draining`` once SIGTERM has begun a drain (so routers stop sending).

    A scheduler may define ``health() -> str | None`` (e.g. ``global``: Redis unreachable).
    """
    ctx: EngineContext = request.app.state.engine
    if ctx.drain.draining:
        return json_response({"status": "draining"}, 503)
    check = getattr(ctx.scheduler, "health", None)
    problem = check() if check is not None else None
    if problem:
        return json_response({"status": "unhealthy", "detail": problem}, 503)
    return json_response({"status": "ok"})


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format."""
    ctx: EngineContext = request.app.state.engine
    queued = await ctx.scheduler.get_unhandled_request_num()
    ctx.metrics.num_requests_waiting.set(queued + len(ctx.serving.engine.batcher.waiting))
    return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def abort_requests(request: Request) -> Response:
    """``POST /v1/abort_requests``: ``{"req_ids": [...]}`` or ``{"abort_all": true}``."""
    ctx: EngineContext = request.app.state.engine
    try:
        body: Any = orjson.loads(await read_body(request, ctx.max_body_bytes))
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"malformed JSON body: {exc}", code="invalid_json") from None
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
    return json_response(exc.body(), exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = APIError(exc.status_code, str(exc.detail), code="not_found"
                     if exc.status_code == 404 else None)
    return json_response(error.body(), exc.status_code, dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("engine.request_failed", path=request.url.path)
    error = APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                     type="internal_server_error")
    return json_response(error.body(), 500)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client left (or the HTTP server dropped a body it could not parse) mid-body: nobody
    # reads an answer, and it is no engine failure to log.
    return Response(status_code=499)


_HANDLERS: dict[Any, Any] = {
    APIError: _api_error,
    ClientDisconnect: _client_gone,
    HTTPException: _http_error,
    Exception: _internal_error,
}


def build_app(ctx: EngineContext, components: Sequence[Component]) -> Starlette:
    """The API app; ``components`` start in order when it starts and stop in reverse."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for component in components:
                await component.start()
                stack.push_async_callback(component.stop)
            log.info("engine.serving", model=ctx.model_name, instance=ctx.instance_id)
            yield

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/abort_requests", abort_requests, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers=_HANDLERS, lifespan=lifespan)
    # Redirecting /health/ to /health would echo the client's Host header into Location.
    app.router.redirect_slashes = False
    app.state.engine = ctx
    return app


def build_metrics_app(ctx: EngineContext) -> Starlette:
    """``/metrics`` alone, for a ``--metrics-port`` apart from the API port."""
    app = Starlette(routes=[Route("/metrics", metrics, methods=["GET"])],
                    exception_handlers=_HANDLERS)
    app.router.redirect_slashes = False
    app.state.engine = ctx
    return app
