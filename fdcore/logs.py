"""structlog set-up shared by the router and the engine."""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}


class _Stdio:
    """Writes to whatever ``sys.stdout`` or ``sys.stderr`` is at that moment.

    Binding the stream object itself would keep writing to one that a caller (a test runner
    capturing output, for instance) has since swapped out and closed.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        """Write ``text`` to the current stream."""
        stream: IO[str] = getattr(sys, self.name)
        return stream.write(text)

    def flush(self) -> None:
        """Flush the current stream."""
        stream: IO[str] = getattr(sys, self.name)
        stream.flush()


def configure_logging(level: str = "info", fmt: str = "console", output: str = "stdout",
                      file: str | None = None) -> None:
    """Route structlog (and the standard library's loggers) to one stream in one format."""
    stream: Any
    if output == "file":
        stream = open(file or "fdcore.log", "a", buffering=1)  # noqa: SIM115 - lives with the process
    else:
        stream = _Stdio("stderr" if output == "stderr" else "stdout")
    numeric = _LEVELS[level.lower()]
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=stream,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
