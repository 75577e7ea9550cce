"""Serving an ASGI app on uvloop with uvicorn (httptools) or hypercorn, stopping cleanly on
SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import structlog
from starlette.types import ASGIApp

HttpServer = Literal["uvicorn", "hypercorn"]
log = structlog.get_logger("fdcore.server")


async def serve_app(app: ASGIApp, host: str, port: int, server: HttpServer = "uvicorn") -> None:
    """Serve ``app`` until SIGINT or SIGTERM.

    uvicorn with httptools is the default: on the router's proxy path it measured about 1.5x the
    requests/s of hypercorn (docs/architecture.md). hypercorn remains for HTTP/2 (h2c) clients.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("listening", url=f"http://{host}:{port}", server=server)
    if server == "hypercorn":
        await _hypercorn(app, host, port, stop)
    else:
        await _uvicorn(app, host, port, stop)


async def _uvicorn(app: ASGIApp, host: str, port: int, stop: asyncio.Event) -> None:
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, loop="none", http="httptools", lifespan="on",
        access_log=False, log_config=None, timeout_keep_alive=75, timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    waiting = asyncio.ensure_future(stop.wait())
    await asyncio.wait((serving, waiting), return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    waiting.cancel()
    await serving


async def _hypercorn(app: ASGIApp, host: str, port: int, stop: asyncio.Event) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    # A Logger (not "-") makes hypercorn log through the standard library set-up of fdcore.logs.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.graceful_timeout = 5
    await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on uvloop where available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())
    else:
        uvloop.run(main())
