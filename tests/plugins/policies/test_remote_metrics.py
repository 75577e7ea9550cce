"""Scraped load: Prometheus text parsing, the background scraper, fallbacks, remote policies."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fdcore_plugins.policies.metrics_scraper import InvalidMetrics, ScrapeConfig, parse_metrics
from prometheus_client import CollectorRegistry

from tests.plugins.policies.policy_helpers import (
    MetricsServer,
    SimRouter,
    build_policy,
    fd_metrics,
    make_instances,
    sample_value,
)

FD = ScrapeConfig().metric_names()
SHARED = "Answer in French. " * 8  # 144 chars: 2 full blocks


def test_presets_and_overrides() -> None:
    assert FD == ("fastdeploy:num_requests_running", "fastdeploy:num_requests_waiting")
    vllm = ScrapeConfig.model_validate({"metrics-preset": "vllm"})
    assert vllm.metric_names() == ("vllm:num_requests_running", "vllm:num_requests_waiting")
    sglang = ScrapeConfig.model_validate(
        {"metrics-preset": "sglang", "metrics-waiting-name": "my_queue"}
    )
    assert sglang.metric_names() == ("sglang:num_running_reqs", "my_queue")


def test_labelled_samples_are_summed() -> None:
    text = (
        "# HELP vllm:num_requests_running Running.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="odd } name, \\"q\\""} 3.0\n'
        "vllm:num_requests_running_total 99\n"
        'vllm:num_requests_waiting{model_name="m"} 1.0 1700000000000\n'
        "something_else{broken\n"
    )
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting")
    assert parse_metrics(text, names) == {names[0]: 5.0, names[1]: 1.0}


@pytest.mark.parametrize("text", [
    "fastdeploy:num_requests_running 1\n",  # waiting missing
    "fastdeploy:num_requests_running abc\nfastdeploy:num_requests_waiting 0\n",
    "fastdeploy:num_requests_running NaN\nfastdeploy:num_requests_waiting 0\n",
    "",
])
def test_unusable_pages_are_invalid(text: str) -> None:
    with pytest.raises(InvalidMetrics):
        parse_metrics(text, FD)


async def remote_setup(servers: Any, pages: list[str], name: str = "fd_remote_metrics_score",
                       config: dict[str, Any] | None = None) -> tuple[Any, list, list, Any]:
    started = [await servers(MetricsServer(page)) for page in pages]
    instances = make_instances(len(pages), metrics_ports=[s.port for s in started])
    registry = CollectorRegistry()
    policy = build_policy(name, instances, {"metrics-timeout-secs": 0.2, **(config or {})},
                          registry)
    await policy.start()
    await policy.refresh()
    return policy, instances, started, registry


def scrapes(registry: CollectorRegistry, instance: Any, result: str,
            policy: str = "fd_remote_metrics_score") -> float:
    return sample_value(registry, "fdcore_policy_metrics_scrape_total", policy=policy,
                        role="mixed", instance=instance.url, result=result)


def fallbacks(registry: CollectorRegistry, instance: Any,
              policy: str = "fd_remote_metrics_score") -> float:
    return sample_value(registry, "fdcore_policy_metrics_fallback_total", policy=policy,
                        role="mixed", instance=instance.url)


@pytest.mark.parametrize(("weight", "expected"), [(1, 1), (10, 0)])
async def test_scores_scraped_running_and_waiting(servers: Any, weight: float,
                                                  expected: int) -> None:
    pages = [fd_metrics(4, 0), fd_metrics(1, 1), fd_metrics(0, 3)]
    policy, instances, _, registry = await remote_setup(
        servers, pages, config={"waiting-weight": weight})
    try:
        router = SimRouter(policy, instances)
        sent = await router.send("hi")
        router.finish(sent)
    finally:
        await policy.stop()
    assert sent.instance is instances[expected]
    assert all(scrapes(registry, i, "ok") >= 1 for i in instances)
    assert all(fallbacks(registry, i) == 0 for i in instances)


async def test_requests_sent_since_the_scrape_count_until_released(servers: Any) -> None:
    policy, instances, _, _ = await remote_setup(servers, [fd_metrics(0, 0), fd_metrics(2, 0)])
    a, b = instances
    try:
        router = SimRouter(policy, instances)
        sent = [await router.send("hi") for _ in range(4)]
        # a: 0, 1, 2 (tie with b's 2: first url), then 3 > 2.
        assert [s.instance for s in sent] == [a, a, a, b]
        for s in sent:
            router.finish(s)
        assert policy.in_flight_credit() == 0
        # Requests sent before a round began are the engine's to report, not credit.
        held = [await router.send("hi") for _ in range(3)]
        await policy.refresh()
        after = await router.send("hi")
        assert after.instance is a
        for s in [*held, after]:
            router.finish(s)
        assert policy.in_flight_credit() == 0
    finally:
        await policy.stop()


@pytest.mark.parametrize(("mode", "page", "result"), [
    ("error", fd_metrics(0, 0), "error"),
    ("hang", fd_metrics(0, 0), "timeout"),
    ("ok", "unrelated_metric 1\n", "invalid"),
])
async def test_failed_scrapes_fall_back_to_the_routers_counters(
    servers: Any, mode: str, page: str, result: str
) -> None:
    policy, instances, started, registry = await remote_setup(
        servers, [fd_metrics(0, 0), fd_metrics(5, 0)])
    a, b = instances
    try:
        started[1].mode, started[1].text = mode, page
        await policy.refresh()
        b.load.requests = 1  # what the router itself sees of b
        a.load.requests = 2
        router = SimRouter(policy, instances)
        sent = await router.send("hi")  # a: scraped 0 + 0 credit; b: 1 from the counters
        router.finish(sent)
    finally:
        await policy.stop()
    assert sent.instance is a
    assert scrapes(registry, b, result) >= 1
    assert fallbacks(registry, b) >= 1
    assert fallbacks(registry, a) == 0


async def test_stale_samples_fall_back(servers: Any) -> None:
    policy, instances, _, registry = await remote_setup(
        servers, [fd_metrics(3, 0), fd_metrics(0, 0)], config={"metrics-max-age-secs": 5})
    try:
        policy.scraper.clock = lambda: time.monotonic() + 60
        router = SimRouter(policy, instances)
        sent = await router.send("hi")  # both on counters (0, 0): the first url
        router.finish(sent)
    finally:
        await policy.stop()
    assert sent.instance is instances[0]
    assert all(fallbacks(registry, i) == 1 for i in instances)


async def test_forget_drops_samples(servers: Any) -> None:
    policy, instances, _, registry = await remote_setup(servers, [fd_metrics(9, 0)])
    try:
        policy.forget(instances[0])
        await SimRouter(policy, instances).send("hi")
    finally:
        await policy.stop()
    assert fallbacks(registry, instances[0]) == 1


@pytest.mark.parametrize("config", [{"load-factor": 0}, {"load-factor": 1.25}],
                         ids=["scored", "bounded"])
async def test_remote_cache_aware_weighs_scraped_load_against_the_cache(
    servers: Any, config: dict[str, Any]
) -> None:
    name = "remote_cache_aware"
    policy, instances, started, registry = await remote_setup(
        servers, [fd_metrics(10, 0), fd_metrics(0, 0)], name=name, config=config)
    a, b = instances
    try:
        router = SimRouter(policy, instances)
        router.finish(await router.send(SHARED, candidates=[a]))
        # a holds the prefix but its engine reports 10 requests: an imbalance to FastDeploy's
        # rule, over the bound (ceil(1.25 * 11 / 2) = 7) for bounded affinity; so not a.
        away = await router.send(SHARED)
        router.finish(away)
        for server in started:
            server.text = fd_metrics(1, 0)
        await policy.refresh()
        back = await router.send(SHARED)
        router.finish(back)
    finally:
        await policy.stop()
    assert away.instance is b
    assert back.instance is a  # balanced again: both hold it now, the first url in turn
    assert scrapes(registry, a, "ok", policy=name) >= 2
