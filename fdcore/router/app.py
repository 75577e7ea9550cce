"""The router's ASGI app factory."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fdcore.config import RouterConfig
from fdcore.plugins import PluginSet, load_plugins
from fdcore.router import admin
from fdcore.router.errors import error_response
from fdcore.router.state import RouterState, build_state


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, "not_found" if exc.status_code == 404
                          else "invalid_request_error", headers=dict(exc.headers or {}))


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


def create_app(config: RouterConfig, plugins: PluginSet | None = None) -> Starlette:
    """Build a router app with its own plugin manager, registry and metrics."""
    if plugins is None:
        plugins = load_plugins(config.plugins.enable, config.plugins.block)
    state = build_state(config, plugins)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    routes = [
        Route("/v1/chat/completions", state.proxy.handler("chat"), methods=["POST"]),
        Route("/v1/completions", state.proxy.handler("completions"), methods=["POST"]),
        Route("/v1/models", admin.models, methods=["GET"]),
        Route("/v1/abort_requests", admin.abort_requests, methods=["POST"]),
        Route("/register", admin.register, methods=["POST"]),
        Route("/registered", admin.registered, methods=["GET"]),
        Route("/registered_number", admin.registered_number, methods=["GET"]),
        Route("/health", admin.health, methods=["GET"]),
        Route("/health_generate", admin.health_generate, methods=["GET"]),
        Route("/metrics", admin.metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.fdcore = state
    return app


def state_of(app: Starlette) -> RouterState:
    """The :class:`RouterState` of an app built by :func:`create_app`."""
    state: RouterState = app.state.fdcore
    return state
