"""``/metrics``: requests, in-flight, latency, time to first byte, selections, health."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.router.conftest import RouterFactory, wait_until

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def _scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain")
        return await resp.text()


async def test_metrics_cover_the_router(backends, router: RouterFactory) -> None:
    a, b = backends(2)
    r = router([a, b])
    await r.wait_healthy(2)
    for _ in range(2):
        await r.post("/v1/chat/completions", CHAT)
    await r.post("/v1/completions", {"prompt": 1})
    await r.post("/v1/completions", {"prompt": "x"}, headers={"x-test-status": "422"})
    text = await _scrape(r.url)
    assert 'fdcore_router_requests_total{endpoint="/v1/chat/completions",status="200"} 2.0' in text
    assert 'fdcore_router_requests_total{endpoint="/v1/completions",status="400"} 1.0' in text
    assert 'fdcore_router_requests_total{endpoint="/v1/completions",status="422"} 1.0' in text
    assert 'http_requests_total{endpoint="/v1/chat/completions",method="POST",status_code="200"} 2.0' in text
    assert 'fdcore_router_request_duration_seconds_count{endpoint="chat"} 2.0' in text
    assert 'fdcore_router_time_to_first_byte_seconds_count{endpoint="chat"} 2.0' in text
    for backend in (a, b):
        assert (f'fdcore_router_selections_total{{instance="{backend.url}",policy="round_robin",'
                f'role="mixed"}}') in text
        assert f'fdcore_router_instance_healthy{{instance="{backend.url}",role="mixed"}} 1.0' in text
    await a.post("/test/health", {"ok": False})

    async def a_down() -> bool:
        return f'fdcore_router_instance_healthy{{instance="{a.url}",role="mixed"}} 0.0' in (
            await _scrape(r.url)
        )

    await wait_until(a_down)


async def test_inflight_gauge_follows_requests(backends, router: RouterFactory) -> None:
    (a,) = backends(1)
    r = router([a])
    await r.wait_healthy(1)
    gauge = f'fdcore_router_inflight_requests{{instance="{a.url}",role="mixed"}}'
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(
            f"{r.url}/v1/chat/completions", json=CHAT, headers={"x-test-hang": "1"}
        ))

        async def one_inflight() -> bool:
            return f"{gauge} 1.0" in await _scrape(r.url)

        await wait_until(one_inflight)
        await a.post("/test/release", {})
        resp = await task
        assert resp.status == 200
        resp.release()
    assert f"{gauge} 0.0" in await _scrape(r.url)
