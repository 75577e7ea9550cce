"""Requests that come back to a router they have passed through are refused, not looped."""

from __future__ import annotations

from typing import Any

from tests.router.conftest import Router, RouterFactory

CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


class _AsInstance:
    """A router listed as another router's instance."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def payload(self, **extra: Any) -> dict[str, Any]:
        return {"role": "mixed", "host_ip": "127.0.0.1", "port": self.router.port, **extra}


async def test_two_routers_pointing_at_each_other(router: RouterFactory) -> None:
    first = router()
    second = router([_AsInstance(first)])  # type: ignore[list-item]
    await second.wait_healthy(1)
    status, body, _ = await first.post("/register", _AsInstance(second).payload())
    assert status == 200, body
    await first.wait_healthy(1)
    status, body, _ = await first.post("/v1/chat/completions", CHAT)
    assert status == 508, body
    assert body["error"]["type"] == "loop_detected"
    # Each router still answers its own health.
    for r in (first, second):
        status, _ = await r.get("/health")
        assert status == 200


async def test_too_many_hops(backends: Any, router: RouterFactory) -> None:
    (backend,) = backends(1)
    r = router([backend])
    await r.wait_healthy(1)
    via = ",".join(f"{n:016x}" for n in range(8))
    status, body, _ = await r.post("/v1/chat/completions", CHAT, headers={"x-fdcore-via": via})
    assert status == 508, body
    status, body, _ = await r.post("/v1/chat/completions", CHAT,
                                   headers={"x-fdcore-via": "0123456789abcdef"})
    assert status == 200, body
    seen = (await backend.state())["requests"]
    (rid,) = seen
    assert seen[rid]["headers"]["x-fdcore-via"].startswith("0123456789abcdef,")
