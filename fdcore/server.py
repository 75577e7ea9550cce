"""Serving an ASGI app with hypercorn on uvloop, stopping cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.types import ASGIApp


def hypercorn_config(host: str, port: int) -> Config:
    """Hypercorn settings for fdcore's servers: no access log on the hot path."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    # A Logger (not "-") makes hypercorn log through the standard library set-up of fdcore.logs.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.graceful_timeout = 5
    return config


async def serve_app(app: ASGIApp, host: str, port: int) -> None:
    """Serve ``app`` until SIGINT or SIGTERM."""
    import structlog

    structlog.get_logger("fdcore.server").info("listening", url=f"http://{host}:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(app, hypercorn_config(host, port), shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on uvloop where available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())
    else:
        uvloop.run(main())
