"""Bounded waits at the router's HTTP server: slow headers, stalled bodies, the connection cap.

Each test waits for a server-side timeout to fire (that is what is under test) and asserts on
the outcome, never on the time it took; the deadlines only bound a broken run.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import orjson
import pytest

from fdcore.testing.cluster import BackendFactory
from tests.router.conftest import Router, RouterFactory, wait_until

CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
SERVERS = pytest.mark.parametrize("http_server", ["uvicorn", "hypercorn"])


async def _read_until_closed(reader: asyncio.StreamReader, deadline: float = 20) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), deadline)


async def _health_ok(router: Router) -> bool:
    status, body = await router.get("/health")
    return status == 200 and body["status"] == "ok"


async def _trickle(writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> bytes:
    """Send one header byte at a time until the server closes; return what it answered."""
    writer.write(b"GET /health HTTP/1.1\r\nHost: router\r\nX-Slow: ")
    for _ in range(400):  # a hang guard: the server must close long before this runs out
        try:
            return await asyncio.wait_for(reader.read(), 0.1)
        except TimeoutError:
            writer.write(b"a")
    raise AssertionError("the server never closed the slow connection")


@SERVERS
async def test_slow_headers_are_cut_off(backends: BackendFactory, router: RouterFactory, http_server: str) -> None:
    (backend,) = backends(1)
    r = router([backend], server={"http-server": http_server, "header-timeout-secs": 0.5,
                                  "keep-alive-timeout-secs": 30})
    await r.wait_healthy(1)
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", r.port)
    slow = asyncio.ensure_future(_trickle(writer, reader))
    # Meanwhile, other clients are served as usual.
    status, body, _ = await r.post("/v1/chat/completions", CHAT)
    assert status == 200 and body["choices"][0]["message"]["content"] == "hello from b0"
    # Closed without an answer: no request arrived to answer.
    assert await slow == b""
    assert await _read_until_closed(silent_reader) == b""
    for w in (writer, silent_writer):
        w.close()
    assert await _health_ok(r)


@SERVERS
async def test_stalled_body_is_dropped(backends: BackendFactory, router: RouterFactory, http_server: str) -> None:
    (backend,) = backends(1)
    r = router([backend], server={"http-server": http_server, "body-timeout-secs": 1})
    await r.wait_healthy(1)
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    declared = 30 * 1024 * 1024
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: " + str(declared).encode() + b"\r\n\r\n")
    writer.write(b"[" + b" " * (1024 * 1024))  # 1 MB of a 30 MB body, then nothing
    await writer.drain()
    answer = await _read_until_closed(reader)
    # uvicorn closes; hypercorn (ASGI-level deadline) answers 408 first.
    if answer:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        assert orjson.loads(body)["error"]["type"] == "request_timeout"
    writer.close()
    # The body was dropped, not forwarded; the router goes on serving.
    assert (await backend.state())["requests"] == {}
    status, _, _ = await r.post("/v1/chat/completions", CHAT)
    assert status == 200


async def _held_stream(session: aiohttp.ClientSession, router: Router, rid: str) -> Any:
    resp = await session.post(f"{router.url}/v1/chat/completions", json={**CHAT, "stream": True},
                              headers={"x-test-chunk-wait": "1", "x-request-id": rid})
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")  # in flight, held by the backend
    return resp


@SERVERS
async def test_connections_over_the_cap_get_503(
    backends: BackendFactory, router: RouterFactory, http_server: str
) -> None:
    (backend,) = backends(1)
    cap = 4
    r = router([backend], server={"http-server": http_server, "max-connections": cap})
    await r.wait_healthy(1)
    async with contextlib.AsyncExitStack() as stack:
        held = []
        for index in range(cap):
            session = await stack.enter_async_context(aiohttp.ClientSession())
            held.append(await _held_stream(session, r, f"held-{index}"))
        status, body, headers = await r.post("/v1/chat/completions", CHAT)
        assert status == 503
        assert body["error"]["type"] == "service_unavailable"
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert headers["connection"] == "close"
        await backend.post("/test/release", {})
        for resp in held:
            assert (await resp.content.read()).endswith(b"data: [DONE]\n\n")
            resp.close()
    # Once they are gone, new connections are served again.
    await wait_until(lambda: _chat_ok(r))


async def _chat_ok(router: Router) -> bool:
    status, _, _ = await router.post("/v1/chat/completions", CHAT)
    return status == 200


@SERVERS
async def test_oversized_request_head_is_refused(
    backends: BackendFactory, router: RouterFactory, http_server: str
) -> None:
    """A head that keeps growing (fast, within the header timeout) is cut off with a 4xx, not
    buffered without bound; the router serves the next client."""
    (backend,) = backends(1)
    r = router([backend], server={"http-server": http_server})
    await r.wait_healthy(1)
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: router\r\n")
        answer = b""
        for n in range(200):  # 200 x 2 KiB: far past any head limit
            writer.write(b"x-filler-%d: " % n + b"a" * 2048 + b"\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            if reader.at_eof() or writer.is_closing():
                break
        with contextlib.suppress(ConnectionError):
            answer = await _read_until_closed(reader)
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
    if http_server == "uvicorn":  # fdcore's lingering close: the 431 always arrives
        assert status == 431 and b"request_header_fields_too_large" in answer, answer[:200]
    else:  # hypercorn (h11) answers 400 or 431 at 16 KiB and closes at once: a reset may eat it
        assert status in (400, 431) or answer == b"", answer[:200]
    await wait_until(lambda: _health_ok(r))
