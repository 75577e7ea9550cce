"""Serving ASGI apps on uvloop with uvicorn (httptools) or hypercorn: bounded waits per
connection (:mod:`fdcore.server_limits`) and a graceful drain on SIGTERM.

Drain, in order: the first SIGINT/SIGTERM calls ``drain.begin()`` and stops accepting
connections; in-flight requests get ``limits.drain_grace`` seconds to finish; then
``drain.expire()`` tells the app to end what remains (the router's proxy sends an SSE error
event) and it gets :data:`FLUSH_SECONDS` more before connections close. A second signal stops at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict
from typing import Any, Literal

import structlog
from starlette.types import ASGIApp

from fdcore.drain import Drain
from fdcore.errors import StartupError
from fdcore.server_limits import RequestGuard, ServerLimits

HttpServer = Literal["uvicorn", "hypercorn"]
log = structlog.get_logger("fdcore.server")
# After the grace period: long enough to write a final SSE event, short enough for a deploy.
FLUSH_SECONDS = 2.0
# File descriptors besides client connections: upstream pools, logs, Redis, the listeners.
_FD_HEADROOM = 256


class _Signals:
    """First SIGINT/SIGTERM: ``stop`` (drain); a second one: ``force`` (stop at once).

    ``on_stop`` callbacks run inside the signal handler, so that every request the server
    reads after the signal already sees the drain (no window where it stops but says ``ok``,
    or says ``draining`` but still accepts connections).
    """

    def __init__(self, *on_stop: Callable[[], None]) -> None:
        self.on_stop = list(on_stop)
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._received, sig)

    def _received(self, sig: int) -> None:
        if self.stop.is_set():
            log.warning("stopping at once", signal=signal.Signals(sig).name)
            self.force.set()
        else:
            log.info("draining", signal=signal.Signals(sig).name)
            for callback in self.on_stop:
                callback()
            self.stop.set()


async def serve_app(
    app: ASGIApp, host: str, port: int, server: HttpServer = "uvicorn",
    limits: ServerLimits | None = None, drain: Drain | None = None,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then drain (see the module docstring).

    uvicorn with httptools is the default: on the router's proxy path it measured about 1.5x the
    requests/s of hypercorn (docs/architecture.md). hypercorn remains for HTTP/2 (h2c) clients.
    """
    await serve_apps([(app, port)], host, server, limits, drain)


async def serve_apps(
    apps: Sequence[tuple[ASGIApp, int]], host: str, server: HttpServer = "uvicorn",
    limits: ServerLimits | None = None, drain: Drain | None = None,
) -> None:
    """Serve each ``(app, port)`` on ``host``; one signal drains them all together."""
    limits = limits or ServerLimits()
    _raise_fd_limit(limits.max_connections * len(apps))
    signals = _Signals(*([drain.begin] if drain is not None else []))
    guards = [RequestGuard(app, limits, enforce=server == "hypercorn") for app, _ in apps]
    # Every port is bound before any app starts: one in use ends start-up with one line.
    sockets = _bind_all(host, [port for _, port in apps])
    for _, port in apps:
        log.info("listening", url=f"http://{host}:{port}", server=server, **asdict(limits))

    async def drain_all() -> None:
        log.info("waiting for in-flight requests", in_flight=sum(g.inflight for g in guards),
                 grace_seconds=limits.drain_grace)
        finished = await _within(_idle(guards), limits.drain_grace, signals.force)
        if drain is not None:
            drain.expire()
        if not finished:
            log.info("ending what remains", in_flight=sum(g.inflight for g in guards),
                     reason="second signal" if signals.force.is_set() else "grace over")
            # Even when forced: the apps only get to write their final events.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_idle(guards), FLUSH_SECONDS)

    bound = list(zip(guards, sockets, strict=True))
    try:
        if server == "hypercorn":
            await _hypercorn(bound, limits, signals, drain_all, guards)
        else:
            await _uvicorn(bound, limits, signals, drain_all)
    finally:
        for sock in sockets:
            sock.close()  # a no-op for those a server already closed or took over


def _bind_all(host: str, ports: Sequence[int]) -> list[socket.socket]:
    """One bound (not yet listening) TCP socket per port; raises StartupError on the first
    that cannot be bound, closing those bound before it."""
    sockets: list[socket.socket] = []
    try:
        for port in ports:
            sockets.append(_bind(host, port))
    except StartupError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; stop what holds the port "
            "or choose another"
        ) from None
    return sock


async def _idle(guards: Sequence[RequestGuard]) -> None:
    # Requests may still arrive on open keep-alive connections while draining.
    while busy := [g for g in guards if g.inflight]:
        await busy[0].idle.wait()


async def _within(done: Awaitable[None], seconds: float, force: asyncio.Event) -> bool:
    """Wait for ``done`` at most ``seconds`` (less if ``force`` is set); whether it finished."""
    waiting = asyncio.ensure_future(done)
    forced = asyncio.ensure_future(force.wait())
    await asyncio.wait((waiting, forced), timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    for task in (waiting, forced):
        task.cancel()
    return waiting.done() and not waiting.cancelled()


def _raise_fd_limit(connections: int) -> None:
    # Each client connection of the router also opens one upstream: a cap above what the file
    # descriptor limit allows is never reached, and accept() fails first (EMFILE).
    wanted = 2 * connections + _FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < wanted:
        log.warning("file descriptor limit below the connection cap", nofile=soft,
                    wanted=wanted, hint="raise `ulimit -n` or lower max-connections")


async def _uvicorn(
    bound: Sequence[tuple[ASGIApp, socket.socket]], limits: ServerLimits, signals: _Signals,
    drain_all: Callable[[], Awaitable[None]],
) -> None:
    import uvicorn

    from fdcore.uvicorn_limits import LimitedHttpToolsProtocol, protocol_class

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # fdcore's own handlers drain first (uvicorn's would stop at once)

    protocol = protocol_class(limits, signals.stop.is_set)
    servers = [
        Server(uvicorn.Config(
            app, loop="none", http=protocol, lifespan="on",
            access_log=False, log_config=None,
            # Typed int, but uvicorn only hands it to call_later: fractions work.
            timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]
            # Only what outlived the drain and its flush is left by then.
            timeout_graceful_shutdown=1,
        ))
        for app, _ in bound
    ]

    def stop_accepting() -> None:
        for s in servers:
            for listener in getattr(s, "servers", ()):  # set once started
                listener.close()  # existing connections stay open
            for conn in list(s.server_state.connections):
                if isinstance(conn, LimitedHttpToolsProtocol):
                    conn.begin_drain()

    signals.on_stop.append(stop_accepting)
    serving = [asyncio.ensure_future(s.serve(sockets=[sock]))
               for s, (_, sock) in zip(servers, bound, strict=True)]
    stopping = asyncio.ensure_future(signals.stop.wait())
    await asyncio.wait((*serving, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if signals.stop.is_set() and all(s.started for s in servers):
        await drain_all()
    for s in servers:
        s.should_exit = True
        if signals.force.is_set():
            # At once, yet through the apps' lifespan shut-down: closed connections end their
            # requests as disconnects (uvicorn's force_exit would skip the shut-down).
            for conn in list(s.server_state.connections):
                conn.transport.close()
    await asyncio.gather(*serving)


async def _hypercorn(
    bound: Sequence[tuple[ASGIApp, socket.socket]], limits: ServerLimits, signals: _Signals,
    drain_all: Callable[[], Awaitable[None]], guards: Sequence[RequestGuard],
) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    def config(sock: socket.socket) -> Config:
        hc = Config()
        # hypercorn wraps the descriptor in a socket of its own and closes it when done.
        hc.bind = [f"fd://{sock.detach()}"]
        hc.accesslog = None
        # A Logger (not "-") makes hypercorn log through the standard library set-up of
        # fdcore.logs.
        hc.errorlog = logging.getLogger("hypercorn.error")
        # hypercorn has one idle timer, from connect or the last answer to the next request's
        # headers: it bounds the header read too, so it is the smaller of the two.
        hc.keep_alive_timeout = min(limits.keep_alive_timeout, limits.header_timeout)
        # On the signal hypercorn stops accepting and closes idle connections, then waits this
        # long for the rest: the drain below ends them by then.
        hc.graceful_timeout = limits.drain_grace + FLUSH_SECONDS + 1
        return hc

    tasks = [
        asyncio.ensure_future(serve(app, config(sock),  # type: ignore[arg-type]
                                    shutdown_trigger=signals.stop.wait))
        for app, sock in bound
    ]
    draining = asyncio.ensure_future(_after(signals.stop, drain_all))

    async def forced_stop() -> None:
        # After a second signal, requests still running past the (shortened) drain would keep
        # hypercorn in its graceful_timeout: then stop serving, skipping the apps' lifespan
        # shut-down. Without any, hypercorn ends by itself, shut-down included.
        await signals.force.wait()
        await draining
        if not any(g.inflight for g in guards):
            await asyncio.Event().wait()

    stopper = asyncio.ensure_future(forced_stop())
    serving = asyncio.gather(*tasks)
    try:
        await asyncio.wait((serving, stopper), return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # a failed lifespan start-up, for instance, ends serving
    finally:
        for task in (*tasks, draining, stopper):
            task.cancel()
        await asyncio.gather(*tasks, draining, stopper, return_exceptions=True)


async def _after(event: asyncio.Event, then: Callable[[], Awaitable[None]]) -> None:
    await event.wait()
    await then()


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on uvloop where available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())
    else:
        uvloop.run(main())
