"""A started stream whose instance goes quiet ends with a clean SSE error event after
``proxy.stream-idle-timeout-secs``, instead of holding the client until the total deadline."""

from __future__ import annotations

import os
import signal

import aiohttp
import orjson

from tests.router.conftest import Backend, Router, RouterFactory, wait_until

CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def _stream_events(r: Router, rid: str) -> list[bytes]:
    """Stream one request whose instance stops after its first chunk; return its SSE lines."""
    events = []
    async with aiohttp.ClientSession() as session, session.post(
        f"{r.url}/v1/chat/completions", json=CHAT,
        headers={"x-request-id": rid, "x-test-chunks": "3", "x-test-chunk-wait": "1"},
    ) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.strip():
                events.append(line.strip())
    return events


def _check_ended_by_idle_timeout(events: list[bytes], backend: Backend) -> None:
    assert events[0].startswith(b"data: {") and b"b0-0" in events[0]
    error = orjson.loads(events[-1][len(b"data: "):])["error"]
    assert error["code"] == "504" and error["type"] == "timeout"  # string code (issue 9)
    assert "sent nothing for 0.5s" in error["message"]
    assert len(events) == 2  # no further chunk, no [DONE]


async def _instances_idle(r: Router) -> None:
    async def settled() -> bool:
        return all(w["in_flight_requests"] == 0 for w in await r.instances())

    await wait_until(settled)


async def test_quiet_stream_ends_with_an_error_event(backends, router: RouterFactory) -> None:
    (backend,) = backends(1)
    r = router([backend], proxy={"stream-idle-timeout-secs": 0.5})
    await r.wait_healthy(1)
    events = await _stream_events(r, "quiet-1")
    _check_ended_by_idle_timeout(events, backend)

    async def cancelled() -> bool:  # the router closed the upstream: the instance stops
        return "quiet-1" in (await backend.state())["cancelled"]

    await wait_until(cancelled)
    await _instances_idle(r)


async def test_stopped_instance_mid_stream(backends, router: RouterFactory) -> None:
    (backend,) = backends(1)
    r = router([backend], proxy={"stream-idle-timeout-secs": 0.5},
               manager={"health-check-interval-secs": 60})
    await r.wait_healthy(1)
    assert backend.proc.proc is not None
    pid = backend.proc.proc.pid
    events = []
    try:
        async with aiohttp.ClientSession() as session, session.post(
            f"{r.url}/v1/chat/completions", json=CHAT,
            headers={"x-request-id": "stopped-1", "x-test-chunks": "3",
                     "x-test-chunk-wait": "1"},
        ) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.strip():
                    events.append(line.strip())
                    if len(events) == 1:  # the first chunk is out: stop the whole instance
                        os.kill(pid, signal.SIGSTOP)
    finally:
        os.kill(pid, signal.SIGCONT)
    _check_ended_by_idle_timeout(events, backend)
    await _instances_idle(r)


async def test_stopped_instance_before_the_stream_starts(
    backends, router: RouterFactory
) -> None:
    """A stopped instance accepts the connection (the kernel does) but sends nothing: a
    stream request gets a 504 after the idle gap, not after the 600 s first-byte timeout."""
    (backend,) = backends(1)
    r = router([backend], proxy={"stream-idle-timeout-secs": 0.5},
               manager={"health-check-interval-secs": 60})
    await r.wait_healthy(1)
    assert backend.proc.proc is not None
    pid = backend.proc.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        status, body, _ = await r.post("/v1/chat/completions", CHAT)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status == 504, body
    assert "did not answer within 0.5s" in body["error"]["message"]
    await _instances_idle(r)
