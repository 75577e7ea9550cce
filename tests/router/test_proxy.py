"""The proxy against real test backends: relaying, streaming, retries, timeouts, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import aiohttp

from tests.router.conftest import Backend, Router, RouterFactory, wait_until

CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


async def _no_inflight(router: Router) -> None:
    async def settled() -> bool:
        return all(w["in_flight_requests"] == 0 for w in await router.instances())

    await wait_until(settled)


async def test_round_robin_over_two_backends(backends, router: RouterFactory) -> None:
    pair = backends(2)
    r = router(pair)
    await r.wait_healthy(2)
    served = []
    for _ in range(4):
        status, body, headers = await r.post("/v1/chat/completions", CHAT)
        assert status == 200
        served.append(body["choices"][0]["message"]["content"])
        assert headers["x-router-instance-url"] in {b.url for b in pair}
    assert sorted(served) == ["hello from b0"] * 2 + ["hello from b1"] * 2
    status, body, _ = await r.post("/v1/completions", {"prompt": "hi"})
    assert status == 200 and body["object"] == "text_completion"
    await _no_inflight(r)


async def test_request_id_reaches_backend_and_client(backends, router: RouterFactory) -> None:
    (backend,) = backends(1)
    r = router([backend])
    await r.wait_healthy(1)
    _, _, headers = await r.post("/v1/chat/completions", CHAT, headers={"X-Request-Id": "rid-42"})
    assert headers["x-request-id"] == "rid-42"
    _, _, headers = await r.post("/v1/chat/completions", CHAT)
    generated = headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    seen = (await backend.state())["requests"]
    assert "rid-42" in seen and generated in seen
    assert seen["rid-42"]["headers"]["x-request-id"] == "rid-42"
    # The request id is in the router's (JSON, debug-level) logs.
    assert '"request_id": "rid-42"' in r.proc.output()


async def test_backend_error_status_and_body_reach_client(backends, router: RouterFactory) -> None:
    (backend,) = backends(1)
    r = router([backend])
    await r.wait_healthy(1)
    status, body, _ = await r.post("/v1/chat/completions", CHAT, headers={"x-test-status": "422"})
    assert status == 422
    assert body["error"]["message"] == "test backend b0 says 422"
    status, _, _ = await r.post("/v1/chat/completions", CHAT, headers={"x-test-status": "500"})
    assert status == 500
    await _no_inflight(r)


async def test_stream_is_relayed_chunk_by_chunk(backends, router: RouterFactory) -> None:
    (backend,) = backends(1)
    r = router([backend])
    await r.wait_healthy(1)
    headers = {"x-test-chunk-wait": "1", "x-test-chunks": "3", "x-request-id": "s1"}
    async with aiohttp.ClientSession() as session, session.post(
        f"{r.url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    ) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        # The first chunk arrives while the backend is still holding the rest back: the router
        # did not buffer the stream.
        first = await resp.content.readuntil(b"\n\n")
        assert b"b0-0" in first
        assert "s1" in (await backend.state())["inflight"]
        await backend.post("/test/release", {})
        rest = await resp.content.read()
    assert b"b0-1" in rest and b"b0-2" in rest and rest.endswith(b"data: [DONE]\n\n")
    await _no_inflight(r)


async def test_client_disconnect_mid_stream_cancels_upstream(
    backends, router: RouterFactory
) -> None:
    (backend,) = backends(1)
    r = router([backend])
    await r.wait_healthy(1)
    headers = {"x-test-chunk-wait": "1", "x-request-id": "gone-1"}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{r.url}/v1/chat/completions",
                                  json={**CHAT, "stream": True}, headers=headers)
        await resp.content.readuntil(b"\n\n")
        resp.close()  # the client goes away mid-stream

    async def cancelled() -> bool:
        return "gone-1" in (await backend.state())["cancelled"]

    await wait_until(cancelled)
    await _no_inflight(r)
    assert 'fdcore_router_requests_total{endpoint="/v1/chat/completions",status="499"}' in (
        await _metrics(r)
    )


async def test_client_disconnect_before_answer_cancels_upstream(
    backends, router: RouterFactory
) -> None:
    (backend,) = backends(1)
    r = router([backend])
    await r.wait_healthy(1)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(
            f"{r.url}/v1/chat/completions", json=CHAT,
            headers={"x-test-hang": "1", "x-request-id": "gone-2"},
        ))

        async def arrived() -> bool:
            return "gone-2" in (await backend.state())["inflight"]

        await wait_until(arrived)
        await _cancel(task)

    async def cancelled() -> bool:
        return "gone-2" in (await backend.state())["cancelled"]

    await wait_until(cancelled)
    await _no_inflight(r)


async def test_first_byte_timeout_gives_504(backends, router: RouterFactory) -> None:
    (backend,) = backends(1)
    r = router([backend], proxy={"first-byte-timeout-secs": 0.5})
    await r.wait_healthy(1)
    status, body, _ = await r.post("/v1/chat/completions", CHAT, headers={"x-test-hang": "1"})
    assert status == 504
    assert "did not answer" in body["error"]["message"]
    await _no_inflight(r)


async def test_connect_failure_is_retried_on_another_instance(
    backends, router: RouterFactory
) -> None:
    dead, live = backends(2)
    # Health rounds far apart: the router still believes the dead instance is healthy.
    r = router([dead, live], manager={"health-check-interval-secs": 3600})
    await r.wait_healthy(2)
    dead.proc.kill()
    for _ in range(4):
        status, _body, headers = await r.post("/v1/chat/completions", CHAT)
        assert status == 200
        assert headers["x-router-instance-url"] == live.url
    metrics = await _metrics(r)
    assert f'fdcore_router_retries_total{{instance="{dead.url}"}}' in metrics
    await _no_inflight(r)


async def test_retries_are_bounded(backends, router: RouterFactory) -> None:
    pair = backends(2)
    r = router(pair, manager={"health-check-interval-secs": 3600}, proxy={"max-retries": 1})
    await r.wait_healthy(2)
    for backend in pair:
        backend.proc.kill()
    status, body, _ = await r.post("/v1/chat/completions", CHAT)
    assert status == 502
    assert "after 2 attempts" in body["error"]["message"]
    await _no_inflight(r)


async def test_connection_dropped_by_backend_gives_502(backends, router: RouterFactory) -> None:
    pair = backends(2)
    r = router(pair, manager={"health-check-interval-secs": 3600}, proxy={"max-retries": 0})
    await r.wait_healthy(2)
    status, _body, _ = await r.post("/v1/chat/completions", CHAT, headers={"x-test-close": "1"})
    assert status == 502
    await _no_inflight(r)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _metrics(r: Router) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{r.url}/metrics") as resp:
        return await resp.text()


async def test_abort_by_id_goes_to_the_instance_holding_it(
    backends, router: RouterFactory
) -> None:
    pair = backends(2)
    r = router(pair)
    await r.wait_healthy(2)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(
            f"{r.url}/v1/chat/completions", json=CHAT,
            headers={"x-test-hang": "1", "x-request-id": "held"},
        ))
        holder: list[Backend] = []

        async def arrived() -> bool:
            for b in pair:
                if "held" in (await b.state())["inflight"]:
                    holder[:] = [b]
            return bool(holder)

        await wait_until(arrived)
        status, body, _ = await r.post("/v1/abort_requests", {"req_ids": ["held", "nobody"]})
        assert status == 200
        assert {"request_id": "held", "instance": holder[0].url} in body["aborted"]
        assert body["not_found"] == ["nobody"]
        status, body, _ = await r.post("/v1/abort_requests", {"abort_all": True})
        assert status == 200
        assert set(body["instances"]) == {b.url for b in pair}
        for b in pair:
            assert (await b.state())["aborts"][-1] == {"abort_all": True}
        await _cancel(task)
    await _no_inflight(r)


async def test_models_are_aggregated(backends, router: RouterFactory) -> None:
    pair = backends(2)
    r = router(pair)
    await r.wait_healthy(2)
    status, body = await r.get("/v1/models")
    assert status == 200
    assert sorted(m["id"] for m in body["data"]) == ["model-b0", "model-b1", "test-model"]

