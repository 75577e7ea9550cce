"""Graceful drain of a sim engine on SIGTERM: running sequences finish within the grace, or are
aborted when it ends (their streams end with ``finish_reason: abort``), and every KV block is
free again when the engine stops."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
from collections.abc import Callable, MutableMapping
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from fdcore.drain import Drain
from fdcore.engine.app import health
from tests.engine.conftest import Engine, wait_until


def _start_stream(engine: Engine, conn: http.client.HTTPConnection,
                  max_tokens: int) -> http.client.HTTPResponse:
    """A streaming completion, read up to its first token."""
    body = orjson.dumps({"prompt": "a long story", "max_tokens": max_tokens, "stream": True,
                         "ignore_eos": True})
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert b'"text"' in resp.readline()
    return resp


def _stop_and_wait(engine: Engine) -> dict[str, Any]:
    """The exit status is 0 and the log is clean; return the ``engine.stopped`` log fields."""
    proc = engine.proc.proc
    assert proc is not None
    assert proc.wait(60) == 0
    output = engine.proc.output()
    assert "Traceback" not in output, output
    stopped = [json.loads(line) for line in output.splitlines()
               if line.startswith("{") and '"engine.stopped"' in line]
    assert len(stopped) == 1, output
    return dict(stopped[0])


def _refused(engine: Engine) -> bool:
    try:
        socket.create_connection(("127.0.0.1", engine.port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# 3000 tokens take seconds (2 ms a step): far longer than a 0.2 s grace; 1500 fit in 60 s.
@pytest.mark.parametrize(("grace", "max_tokens", "finish"), [("0.2", 3000, "abort"),
                                                           ("60", 1500, "length")])
def test_sigterm_drains_running_sequences(
    start_engine: Callable[..., Engine], grace: str, max_tokens: int, finish: str
) -> None:
    engine = start_engine("--drain-grace-secs", grace, "--log-format", "json",
                          "--block-size", "16", "--num-gpu-blocks", "256")
    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=60)
    try:
        resp = _start_stream(engine, conn, max_tokens)
        assert engine.proc.proc is not None
        engine.proc.proc.send_signal(signal.SIGTERM)
        # New connections are refused while the running stream goes on.
        wait_until(lambda: _refused(engine))
        rest = resp.read()  # raises IncompleteRead if the stream were cut
    finally:
        conn.close()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert f'"finish_reason":"{finish}"'.encode() in rest
    stopped = _stop_and_wait(engine)
    assert stopped["used_blocks"] == 0
    assert stopped["available_blocks"] == stopped["total_blocks"] == 256


def test_health_says_draining_once_the_drain_begins() -> None:
    # Under hypercorn idle connections close at the signal, so few clients ever see this
    # answer over the wire; it is checked here on the engine's own /health handler.
    ctx = SimpleNamespace(drain=Drain(), scheduler=SimpleNamespace(health=lambda: None))
    app = Starlette(routes=[Route("/health", health), Route("/v1/models", lambda r: ok)])
    ok = Response(b"ok")
    app.state.engine = ctx

    async def call(path: str) -> tuple[int, bytes]:
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        await app({"type": "http", "method": "GET", "path": path, "headers": [],
                   "query_string": b""}, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    assert asyncio.run(call("/health")) == (200, b'{"status":"ok"}')
    ctx.drain.begin()
    status, body = asyncio.run(call("/health"))
    assert (status, orjson.loads(body)) == (503, {"status": "draining"})
    assert asyncio.run(call("/v1/models")) == (200, b"ok")
