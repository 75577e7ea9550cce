"""Every default policy, selected by name from YAML, routes real requests through the router."""

from __future__ import annotations

import pytest

from tests.router.conftest import RouterFactory

POLICIES = [
    "random", "round_robin", "power_of_two", "process_tokens", "request_num",
    "fd_metrics_score", "fd_remote_metrics_score", "cache_aware", "remote_cache_aware",
]


@pytest.mark.parametrize("policy", POLICIES)
async def test_policy_routes_and_releases(backends, router: RouterFactory, policy: str) -> None:
    pair = backends(2)
    r = router(pair, scheduler={"policy": policy, "cache-block-size": 4})
    await r.wait_healthy(2)
    served = set()
    for turn in range(6):
        prompt = "shared system prompt " * 4 + f"turn {turn}"
        status, body, headers = await r.post(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
        )
        assert status == 200, body
        served.add(headers["x-router-instance-url"])
    assert served <= {b.url for b in pair}
    assert all(w["in_flight_requests"] == 0 and w["in_flight_tokens"] == 0
               for w in await r.instances())
    text = await r.text("/metrics")
    assert f'policy="{policy}"' in text
