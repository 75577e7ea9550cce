"""Graceful drain of a real router process on SIGTERM: /health says draining, new connections
are refused, a stream in flight finishes within the grace or ends with an SSE error event."""

from __future__ import annotations

import signal
from typing import Any

import aiohttp
import pytest

from fdcore.testing.cluster import BackendFactory
from tests.router.conftest import Backend, Router, RouterFactory, wait_until

CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


async def _start_held_stream(
    session: aiohttp.ClientSession, router: Router, backend: Backend, rid: str
) -> Any:
    resp = await session.post(f"{router.url}/v1/chat/completions", json={**CHAT, "stream": True},
                              headers={"x-test-chunk-wait": "1", "x-request-id": rid})
    assert resp.status == 200
    assert b"b0-0" in await resp.content.readuntil(b"\n\n")
    assert rid in (await backend.state())["inflight"]
    return resp


def _exited(router: Router) -> int:
    assert router.proc.proc is not None
    return router.proc.proc.wait(30)


def _assert_clean_log(router: Router) -> None:
    output = router.proc.output()
    assert "Traceback" not in output, output
    assert "Exception in ASGI application" not in output, output


async def test_drain_lets_the_stream_finish(backends: BackendFactory, router: RouterFactory) -> None:
    (backend,) = backends(1)
    r = router([backend], server={"drain-grace-secs": 60, "keep-alive-timeout-secs": 60})
    await r.wait_healthy(1)
    # The prober keeps its connection as long as the router does (aiohttp's default is 15 s).
    kept = aiohttp.TCPConnector(keepalive_timeout=60)
    async with aiohttp.ClientSession() as streaming, aiohttp.ClientSession(connector=kept) as prober:
        async with prober.get(f"{r.url}/health") as resp:  # a kept-alive connection
            assert resp.status == 200
        stream = await _start_held_stream(streaming, r, backend, "drain-1")
        assert r.proc.proc is not None
        r.proc.proc.send_signal(signal.SIGTERM)

        # The open connection is still answered, with draining (and then closed). Until the
        # router has handled the signal it answers ok and keeps the connection open.
        seen: list[tuple[int, Any]] = []

        async def draining() -> bool:
            async with prober.get(f"{r.url}/health") as resp:
                seen.append((resp.status, await resp.json()))
            return resp.status != 200

        await wait_until(draining)
        status, body = seen[-1]
        assert (status, body["status"]) == (503, "draining")
        # New connections are refused: the listener is closed.
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(f"{r.url}/health")

        await backend.post("/test/release", {})
        rest = await stream.content.read()
    assert b"b0-1" in rest and b"b0-2" in rest and rest.endswith(b"data: [DONE]\n\n")
    assert "drain-1" in (await backend.state())["completed"]
    assert _exited(r) == 0
    _assert_clean_log(r)


@pytest.mark.parametrize("http_server", ["uvicorn", "hypercorn"])
async def test_drain_grace_ends_the_stream_with_an_error_event(
    backends: BackendFactory, router: RouterFactory, http_server: str
) -> None:
    (backend,) = backends(1)
    r = router([backend], server={"drain-grace-secs": 0.5, "http-server": http_server})
    await r.wait_healthy(1)
    async with aiohttp.ClientSession() as session:
        stream = await _start_held_stream(session, r, backend, "drain-2")
        assert r.proc.proc is not None
        r.proc.proc.send_signal(signal.SIGTERM)
        # The backend never releases it: the grace runs out. The body still ends cleanly
        # (read() raises on a truncated chunked body).
        rest = await stream.content.read()
    events = [e for e in rest.split(b"\n\n") if e]
    assert any(e.startswith(b'data: {"error"') for e in events), rest
    assert b"b0-1" not in rest

    async def upstream_closed() -> bool:
        return "drain-2" in (await backend.state())["cancelled"]

    await wait_until(upstream_closed)
    assert _exited(r) == 0
    _assert_clean_log(r)


@pytest.mark.parametrize("http_server", ["uvicorn", "hypercorn"])
async def test_second_signal_stops_at_once(
    backends: BackendFactory, router: RouterFactory, http_server: str
) -> None:
    (backend,) = backends(1)
    r = router([backend], server={"drain-grace-secs": 600, "http-server": http_server})
    await r.wait_healthy(1)
    async with aiohttp.ClientSession() as session:
        stream = await _start_held_stream(session, r, backend, "drain-3")
        assert r.proc.proc is not None
        r.proc.proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:  # two signals sent back to back may arrive as one
            return '"event": "draining"' in r.proc.output()

        await wait_until(draining)
        r.proc.proc.send_signal(signal.SIGTERM)
        rest = await stream.content.read()
    assert any(e.startswith(b'data: {"error"') for e in rest.split(b"\n\n")), rest
    assert _exited(r) == 0  # long before the 600 s grace
    _assert_clean_log(r)
