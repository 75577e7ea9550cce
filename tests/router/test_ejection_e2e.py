"""Outlier ejection and overload through a real router and real test backends."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.router.conftest import Backend, Router, RouterFactory, wait_until

CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
THRESHOLD = 3


async def _entry(router: Router, backend: Backend) -> dict[str, Any]:
    return next(w for w in await router.instances() if w["url"] == backend.url)


async def _send(router: Router, n: int, headers: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """Send ``n`` requests one after another; return (status, serving instance) for each."""
    results = []
    for _ in range(n):
        status, _, got = await router.post("/v1/chat/completions", CHAT, headers=headers)
        results.append((status, got.get("x-router-instance-url", "")))
    return results


async def test_failing_instance_is_ejected_and_returns(backends, router: RouterFactory) -> None:
    bad, good = backends(2)
    r = router([bad, good], scheduler={"policy": "request_num"},
               outlier={"consecutive-failures": THRESHOLD, "base-ejection-secs": 3})
    await r.wait_healthy(2)

    # 4xx are the client's fault: they never eject.
    answers = await _send(r, 2 * THRESHOLD, {"x-test-status": "422"})
    assert {status for status, _ in answers} == {422}
    for backend in (bad, good):
        entry = await _entry(r, backend)
        assert entry["circuit"] == "closed" and entry["consecutive_failures"] == 0

    # /health stays 200 while every inference request gets a 500.
    await bad.post("/test/fail", {"status": 500})
    answers = await _send(r, 30)
    to_bad = [status for status, url in answers if url == bad.url]
    # Without ejection it fails fastest, looks least loaded and takes most of the traffic.
    assert to_bad == [500] * THRESHOLD
    assert all(status == 200 for status, url in answers if url == good.url)
    entry = await _entry(r, bad)
    assert entry["healthy"] is True
    assert entry["circuit"] == "open" and entry["ejections"] == 1
    assert entry["ejected_until"] is not None
    assert (await _entry(r, good))["circuit"] == "closed"
    text = await r.text("/metrics")
    assert f'fdcore_router_instance_ejected{{instance="{bad.url}",role="mixed"}} 1.0' in text
    assert f'fdcore_router_ejections_total{{instance="{bad.url}"}} 1.0' in text

    await bad.post("/test/fail", {"status": 0})

    async def back() -> bool:
        return (await _entry(r, bad))["circuit"] == "closed"

    await wait_until(back)
    answers = await _send(r, 6)
    assert {status for status, _ in answers} == {200}
    assert any(url == bad.url for _, url in answers)
    entry = await _entry(r, bad)
    assert entry["ejections"] == 1 and entry["consecutive_failures"] == 0
    text = await r.text("/metrics")
    assert f'fdcore_router_instance_ejected{{instance="{bad.url}",role="mixed"}} 0.0' in text


async def test_saturated_instances_answer_429_with_retry_after(
    backends, router: RouterFactory
) -> None:
    (backend,) = backends(1)
    r = router([backend], proxy={"max-inflight-per-instance": 1, "retry-after-secs": 2})
    await r.wait_healthy(1)
    held = asyncio.create_task(r.post("/v1/chat/completions", CHAT, headers={"x-test-hang": "1"}))

    async def busy() -> bool:
        return (await _entry(r, backend))["in_flight_requests"] == 1

    await wait_until(busy)
    status, body, headers = await r.post("/v1/chat/completions", CHAT)
    assert status == 429, body
    assert headers["retry-after"] == "2"
    assert "max-inflight-per-instance" in body["error"]["message"]
    await backend.post("/test/release", {})
    status, _, _ = await held
    assert status == 200
    status, _, _ = await r.post("/v1/chat/completions", CHAT)
    assert status == 200
