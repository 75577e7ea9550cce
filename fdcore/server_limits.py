"""Bounds on what one client can hold in a server: how long it may take to send a request, how
many connections it may open, and the in-flight count a graceful drain waits on.

Under uvicorn the per-connection bounds live in the protocol (:mod:`fdcore.uvicorn_limits`);
hypercorn offers no hook per connection, so :class:`RequestGuard` enforces the body deadline and
the cap at the ASGI level there (see ``docs/router.md``, "Timeouts, limits and drain").
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fdcore.http import error_body


@dataclass(frozen=True)
class ServerLimits:
    """Timeouts (seconds) and the connection cap of one HTTP server."""

    header_timeout: float = 10.0  # from connect or the request's first byte to its last header
    body_timeout: float = 60.0  # from the last header to the last body byte
    keep_alive_timeout: float = 75.0  # idle time between requests on one connection
    max_connections: int = 4096  # more are answered 503 and closed
    drain_grace: float = 30.0  # after SIGTERM, how long in-flight requests may take to finish

    @classmethod
    def from_config(cls, config: Any) -> ServerLimits:
        """From a config with ``*_secs`` fields of these names and ``max_connections`` (the
        router's ``server:`` section and the engine's settings both have them)."""
        return cls(
            header_timeout=config.header_timeout_secs, body_timeout=config.body_timeout_secs,
            keep_alive_timeout=config.keep_alive_timeout_secs,
            max_connections=config.max_connections, drain_grace=config.drain_grace_secs,
        )


def _reply(status: int, message: str, type_: str) -> tuple[Message, Message]:
    body = error_body(status, message, type_)
    start: Message = {
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


_OVER_CAP = _reply(503, "the server has too many open connections; retry later",
                   "service_unavailable")
_BODY_TIMEOUT = _reply(408, "the request body did not arrive in time", "request_timeout")


async def reject_over_cap(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app of a connection over the cap: 503 with a JSON body, then close."""
    for message in _OVER_CAP:
        await send(message)


class RequestGuard:
    """Wraps an ASGI app: counts in-flight HTTP requests, for the drain to wait on.

    With ``enforce`` (hypercorn) it also caps in-flight requests at ``max_connections`` (each
    HTTP/1.1 connection carries one at a time) and answers 408 when the body is not complete
    ``body_timeout`` seconds after the headers; the app then reads ``http.disconnect``, which
    frees what it buffered, and the connection closes (its request was never finished).
    """

    def __init__(self, app: ASGIApp, limits: ServerLimits, enforce: bool) -> None:
        self.app = app
        self.limits = limits
        self.enforce = enforce
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.enforce and self.inflight >= self.limits.max_connections:
            await reject_over_cap(scope, receive, send)
            return
        self.inflight += 1
        self.idle.clear()
        try:
            if self.enforce:
                await _BodyDeadline(self.app, self.limits.body_timeout)(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
            if not self.inflight:
                self.idle.set()


class _BodyDeadline:
    """One request whose body must be complete by a deadline."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.deadline = asyncio.get_running_loop().time() + timeout
        self.body_done = False
        self.started = False
        self.timed_out = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded_receive() -> Message:
            if self.body_done or self.timed_out:
                return await receive()
            try:
                async with asyncio.timeout_at(self.deadline):
                    message = await receive()
            except TimeoutError:
                self.timed_out = True
                if not self.started:
                    for reply in _BODY_TIMEOUT:
                        await send(reply)
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                self.body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            if self.timed_out:
                return  # the connection is closing: what the app answers goes nowhere
            if message["type"] == "http.response.start":
                self.started = True
            await send(message)

        await self.app(scope, bounded_receive, guarded_send)

