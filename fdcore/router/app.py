"""The router's ASGI app factory."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import structlog
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fdcore import __version__
from fdcore.config import RouterConfig
from fdcore.http import error_response
from fdcore.plugins import PluginSet, load_plugins
from fdcore.router import admin
from fdcore.router.auth import Access, Guard, Keys
from fdcore.router.openapi import openapi
from fdcore.router.proxy import ENDPOINT_PATHS
from fdcore.router.state import RouterState, build_state
from fdcore.types import HostInfo, Role

log = structlog.get_logger("fdcore.router")


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


class _Endpoint:
    """Lets Starlette answer 405 for the proxy paths; POSTs never reach it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


# Who may call what (docs/router.md, "Security"); /health and /metrics stay open for probes.
ACCESS = {
    **{path: Access.CLIENT for path in (*ENDPOINT_PATHS.values(), "/v1/models")},
    **{path: Access.ADMIN for path in (
        "/register", "/deregister", "/v1/abort_requests", "/registered", "/registered_number",
        "/health_generate",
    )},
}


class RouterApp:
    """The router's ASGI app: inference POSTs go straight to the proxy (the hot path), the
    rest through Starlette (routing, error handlers, lifespan)."""

    def __init__(
        self, starlette: Starlette, fast: dict[str, ASGIApp], keys: Keys | None = None
    ) -> None:
        self.starlette = starlette
        self.fast = fast
        self._app: ASGIApp = starlette
        if keys is not None and keys.configured:
            self._app = Guard(starlette, keys, ACCESS)
        if keys is not None and keys.required(Access.CLIENT):
            # Only then is the hot path guarded: without API keys it does no extra work.
            self.fast = {path: Guard(app, keys, ACCESS) for path, app in fast.items()}

    @property
    def state(self) -> State:
        """The Starlette app's state (``state.fdcore`` is the :class:`RouterState`)."""
        return self.starlette.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            app = self.fast.get(scope["path"])
            if app is not None:
                await app(scope, receive, send)
                return
        await self._app(scope, receive, send)


def _log_start(state: RouterState) -> None:
    """One line naming what this router runs: its policies, health check and plugins."""
    policies = {
        "policy" if role is Role.MIXED else f"{role.value}_policy": policy.name
        for role, policy in state.selector.policies.items()
    }
    plugins = {p.name: f"{p.distribution} {p.version}".strip() for p in state.plugins.plugins}
    log.info("router starting", **policies, health_check=state.config.manager.health_check,
             plugins=plugins)


def create_app(config: RouterConfig, plugins: PluginSet | None = None) -> RouterApp:
    """Build a router app with its own plugin manager, registry and metrics."""
    if plugins is None:
        plugins = load_plugins(config.plugins.enable, config.plugins.block,
                               host=HostInfo("router", __version__))
    state = build_state(config, plugins)
    keys = Keys(config.auth)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        _log_start(state)
        keys.warn_if_open()
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    fast = {path: state.proxy.endpoint(name) for name, path in ENDPOINT_PATHS.items()}
    routes = [
        *(Route(path, _Endpoint(app), methods=["POST"]) for path, app in fast.items()),
        Route("/v1/models", admin.models, methods=["GET"]),
        Route("/v1/abort_requests", admin.abort_requests, methods=["POST"]),
        Route("/register", admin.register, methods=["POST"]),
        Route("/deregister", admin.deregister, methods=["POST"]),
        Route("/registered", admin.registered, methods=["GET"]),
        Route("/registered_number", admin.registered_number, methods=["GET"]),
        Route("/health", admin.health, methods=["GET"]),
        Route("/health_generate", admin.health_generate, methods=["GET"]),
        Route("/metrics", admin.metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    # Redirecting /health/ to /health would echo the client's Host header into Location.
    app.router.redirect_slashes = False
    app.state.fdcore = state
    app.state.auth = keys
    return RouterApp(app, fast, keys)

