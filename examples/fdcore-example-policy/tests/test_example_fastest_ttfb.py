"""``fastest_ttfb`` tested with fdcore's plugin kit: first without HTTP, then through a router
app in this process in front of two real sim engines, one of them slow."""

from __future__ import annotations

from fdcore.plugins import PluginSet
from fdcore.testing.asgi import InProcessRouter
from fdcore.testing.cluster import EngineFactory
from fdcore.testing.policies import SimRouter, build_policy, make_instances
from fdcore.types import Outcome


async def test_routes_to_the_lowest_observed_ttfb(fdcore_plugins: PluginSet) -> None:
    instances = make_instances(3)
    policy = build_policy("fastest_ttfb", instances, {"fastest-ttfb-weight": 0.5},
                          plugins=fdcore_plugins)
    router = SimRouter(policy, instances)
    # Every instance is tried once before any figure is trusted.
    first = [await router.send() for _ in range(3)]
    assert {sent.instance.url for sent in first} == {i.url for i in instances}
    for sent, ttfb in zip(first, (0.5, 0.05, 0.2), strict=True):
        router.finish(sent, ttfb=ttfb)
    for _ in range(5):
        sent = await router.send()
        assert sent.instance is instances[1]
        router.finish(sent, ttfb=0.05)
    # An error counts as slow (fastest-ttfb-failure-secs): the next best takes over.
    sent = await router.send()
    router.finish(sent, Outcome.ERROR, status=502)
    assert (await router.send()).instance is instances[2]


async def test_a_client_that_left_says_nothing_about_the_instance(
    fdcore_plugins: PluginSet,
) -> None:
    instances = make_instances(2)
    router = SimRouter(build_policy("fastest_ttfb", instances, plugins=fdcore_plugins),
                       instances)
    a, b = await router.send(), await router.send()
    router.finish(a, ttfb=0.1)
    router.finish(b, ttfb=0.3)
    sent = await router.send()
    assert sent.instance is a.instance
    router.finish(sent, Outcome.DISCONNECT, status=0)
    assert (await router.send()).instance is a.instance


async def test_in_process_router_learns_the_fast_engine(
    fdcore_plugins: PluginSet, engines: EngineFactory,
) -> None:
    fast, slow = engines(2, profile=[{}, {"decode-seconds-per-step": 0.2}])
    config = {"scheduler": {"policy": "fastest_ttfb"}}
    async with InProcessRouter(config, plugins=fdcore_plugins,
                               instances=[fast.payload(), slow.payload()]) as router:
        chosen = []
        for n in range(10):
            answer = await router.post("/v1/completions",
                                       {"prompt": f"request {n}", "max_tokens": 8})
            assert answer.status == 200, answer.body
            assert answer.json()["usage"]["completion_tokens"] == 8
            chosen.append(answer.headers["x-router-instance-url"])
        # Both tried first; then every request goes to the engine that answers sooner.
        assert set(chosen[:2]) == {fast.url, slow.url}
        assert chosen[2:] == [fast.url] * 8
        policy = router.state.selector.policies[next(iter(router.state.selector.policies))]
        assert policy.ttfb[fast.url] < policy.ttfb[slow.url]
