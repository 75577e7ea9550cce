"""The Selector: in-flight caps (Saturated), ejected instances left out, outcomes counted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
from prometheus_client import generate_latest

from fdcore.config import RouterConfig
from fdcore.router.instances import InstanceRegistry
from fdcore.router.metrics import RouterMetrics
from fdcore.router.selection import NoInstance, Saturated, Selector
from fdcore.types import EmptyConfig, Instance, Outcome, Role, RouteRequest


class First:
    """A policy that takes the first candidate, so tests see exactly what was filtered."""

    name: ClassVar[str] = "first"
    Config = EmptyConfig

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        return candidates[0]

    def release(self, request: RouteRequest, instance: Instance, outcome: Outcome) -> None: ...

    def forget(self, instance: Instance) -> None: ...


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def build(n: int, **sections: Any) -> tuple[Selector, list[Instance], Clock]:
    registry = InstanceRegistry()
    instances = [Instance(f"http://127.0.0.1:{8000 + i}", Role.MIXED, "127.0.0.1", 8000 + i,
                          8000 + i) for i in range(n)]
    for instance in instances:
        registry.upsert(instance, healthy=True)
    clock = Clock()
    config = RouterConfig.model_validate(sections)
    selector = Selector(registry, {Role.MIXED: First()}, RouterMetrics(registry), config, clock)
    return selector, instances, clock


def request(n: int) -> RouteRequest:
    return RouteRequest(f"r{n}", "chat", "hi", {}, 1)


async def test_full_instances_are_skipped_then_saturated() -> None:
    selector, (a, b), _ = build(2, proxy={"max-inflight-per-instance": 1, "retry-after-secs": 7})
    first = await selector.acquire(request(1))
    second = await selector.acquire(request(2))
    assert (first.instance, second.instance) == (a, b)
    with pytest.raises(Saturated) as info:
        await selector.acquire(request(3))
    assert info.value.status == 429 and info.value.retry_after == 7
    assert isinstance(info.value, NoInstance)
    assert "max-inflight-per-instance" in str(info.value)
    first.release(Outcome.SUCCESS)
    third = await selector.acquire(request(3))
    assert third.instance is a


async def test_no_cap_by_default() -> None:
    selector, (a,), _ = build(1)
    leases = [await selector.acquire(request(i)) for i in range(300)]
    assert a.load.requests == 300
    for lease in leases:
        lease.release(Outcome.SUCCESS)
    assert a.load.requests == 0


async def test_no_instance_is_503_without_retry_after() -> None:
    selector, _, _ = build(0)
    with pytest.raises(NoInstance) as info:
        await selector.acquire(request(1))
    assert type(info.value) is NoInstance
    assert info.value.status == 503 and info.value.retry_after is None


async def test_failing_instance_is_ejected_counted_and_returns() -> None:
    selector, (a, b), clock = build(2, outlier={"consecutive-failures": 2,
                                                "base-ejection-secs": 5})
    for i in range(2):
        lease = await selector.acquire(request(i))
        assert lease.instance is a
        lease.release(Outcome.ERROR)
    assert selector.outliers.is_ejected(a.url)
    assert (await selector.acquire(request(9))).instance is b
    text = generate_latest(selector.metrics.registry).decode()
    assert f'fdcore_router_ejections_total{{instance="{a.url}"}} 1.0' in text
    assert f'fdcore_router_instance_ejected{{instance="{a.url}",role="mixed"}} 1.0' in text
    assert f'fdcore_router_instance_ejected{{instance="{b.url}",role="mixed"}} 0.0' in text
    clock.now = 5.0
    assert (await selector.acquire(request(10))).instance is a
    text = generate_latest(selector.metrics.registry).decode()
    assert f'fdcore_router_instance_ejected{{instance="{a.url}",role="mixed"}} 0.0' in text


async def test_disconnects_do_not_eject() -> None:
    selector, (a, _), _ = build(2, outlier={"consecutive-failures": 1})
    lease = await selector.acquire(request(1))
    lease.release(Outcome.DISCONNECT)
    assert not selector.outliers.is_ejected(a.url)


async def test_a_removed_instance_loses_its_breaker() -> None:
    selector, (a, _), _ = build(2, outlier={"consecutive-failures": 1})
    (await selector.acquire(request(1))).release(Outcome.ERROR)
    assert selector.outliers.is_ejected(a.url)
    selector.instances.remove(a.url)
    assert selector.outliers.status(a.url)["ejections"] == 0


def build_pd() -> tuple[Selector, Instance, Instance]:
    registry = InstanceRegistry()
    p = Instance("http://127.0.0.1:8100", Role.PREFILL, "127.0.0.1", 8100, 8100,
                 transfer_protocol=["tcp"])
    d = Instance("http://127.0.0.1:8200", Role.DECODE, "127.0.0.1", 8200, 8200,
                 transfer_protocol=["ipc"])
    for instance in (p, d):
        registry.upsert(instance, healthy=True)
    selector = Selector(registry, {Role.PREFILL: First(), Role.DECODE: First()},
                        RouterMetrics(registry))
    return selector, p, d


async def test_a_pair_that_cannot_form_leaks_no_prefill_counter() -> None:
    selector, p, d = build_pd()

    def incompatible(prefill: Instance, decode: Instance) -> str | None:
        return "no KV transfer protocol in common"

    pr = RouteRequest("r1", "chat", "hi", {}, 5, Role.PREFILL)
    dr = RouteRequest("r1", "chat", "hi", {}, 5, Role.DECODE)
    with pytest.raises(NoInstance, match=f"{d.url}: no KV transfer protocol in common"):
        await selector.acquire_pair(pr, dr, frozenset(), incompatible)
    assert (p.load.requests, p.load.tokens, d.load.requests) == (0, 0, 0)
    assert not selector.inflight

    pair = await selector.acquire_pair(pr, dr, frozenset(), lambda a, b: None, "r1-retry1")
    assert [lease.instance for lease in selector.inflight["r1"]] == [p, d]
    assert {lease.upstream_id for lease in pair} == {"r1-retry1"}
    for lease in pair:
        lease.release(Outcome.SUCCESS)
    assert (p.load.requests, d.load.requests) == (0, 0) and not selector.inflight
