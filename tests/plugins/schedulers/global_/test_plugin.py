"""The ``global`` scheduler driven directly against a real Redis: queues, stealing, results."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from fdcore_plugins.schedulers.global_ import GlobalScheduler
from fdcore_plugins.schedulers.global_.config import GlobalConfig
from fdcore_plugins.schedulers.global_.keys import crc16_ccitt_false, shard_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from fdcore.errors import StartupError
from fdcore.testing import free_port
from fdcore.types import (
    Capacity,
    EngineRequest,
    Rejection,
    RejectionKind,
    RequestOutput,
    SamplingParams,
    SchedulerContext,
)
from tests.plugins.schedulers.global_.conftest import RedisServer

Make = Callable[..., GlobalScheduler]


def room(batch: int) -> Capacity:
    """256 blocks of 16 tokens, 2 reserved per request, a token budget of 2048."""
    return Capacity(256, 16, 2, 2048, batch)


def req(rid: str, prompt_len: int = 4) -> EngineRequest:
    return EngineRequest(rid, list(range(prompt_len)), SamplingParams(), time.time())


def out(rid: str, n: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, [n], finished=finished, completion_tokens=n,
                         finish_reason="length" if finished else None)


@pytest.fixture
async def started(make_scheduler: Make) -> AsyncIterator[Callable[..., asyncio.Future[GlobalScheduler]]]:
    running: list[GlobalScheduler] = []

    async def start(name: str, **options: object) -> GlobalScheduler:
        scheduler = make_scheduler(name, **options)
        await scheduler.start()
        running.append(scheduler)
        return scheduler

    yield start  # type: ignore[misc]
    for scheduler in running:
        await scheduler.stop()


async def collect(
    scheduler: GlobalScheduler, *rids: str, timeout: float = 10.0
) -> dict[str, list[RequestOutput]]:
    """Outputs of ``rids`` until each has a finished one (the deadline guards a hang)."""
    collected: dict[str, list[RequestOutput]] = {rid: [] for rid in rids}
    end = time.monotonic() + timeout
    while not all(outs and outs[-1].finished for outs in collected.values()):
        assert time.monotonic() < end, f"no final output in {collected}"
        for rid, outs in (await scheduler.get_results(timeout=0.2)).items():
            collected.setdefault(rid, []).extend(outs)
    return collected


async def results_until(scheduler: GlobalScheduler, rid: str) -> list[RequestOutput]:
    """Outputs of one request until its finished one."""
    return (await collect(scheduler, rid))[rid]


def test_crc16_and_shards() -> None:
    assert crc16_ccitt_false(b"123456789") == 0x29B1  # the CRC catalogue's check value
    assert shard_of("10.0.0.1:8000", 1) == 0
    assert {shard_of(f"10.0.0.{i}:8000", 4) for i in range(32)} == {0, 1, 2, 3}


async def test_own_requests_round_trip(started: Callable[..., asyncio.Future[GlobalScheduler]]) -> None:
    a = await started("127.0.0.1:1")
    assert await a.put_requests([req("x"), req("y")]) == []
    assert await a.get_unhandled_request_num() == 2
    taken = await a.get_requests(room(8))
    assert [r.request_id for r in taken] == ["x", "y"]
    assert await a.get_unhandled_request_num() == 0
    await a.put_results([out("x", 1), out("x", 2, finished=True), out("y", 1, finished=True)])
    results = await collect(a, "x", "y")
    assert [o.completion_tokens for o in results["x"]] == [1, 2]
    assert results["y"][0].finished


async def test_outcomes_in_order_with_duplicates(started: Callable[..., asyncio.Future[GlobalScheduler]]) -> None:
    a = await started("127.0.0.1:1")
    duplicate = RejectionKind.DUPLICATE_ID
    assert await a.put_requests([req("a"), req("b"), req("a")]) == [
        Rejection("a", duplicate, "duplicate request_id: a")]
    assert await a.put_requests([req("b"), req("c")]) == [
        Rejection("b", duplicate, "duplicate request_id: b")]
    assert [r.request_id for r in await a.get_requests(room(8))] == ["a", "b", "c"]


async def test_load_score_follows_queue(started: Callable[..., asyncio.Future[GlobalScheduler]], raw_redis: Redis) -> None:
    a = await started("127.0.0.1:1")
    keys = a.queues.keys
    await a.put_requests([req(f"r{i}") for i in range(5)])
    assert await raw_redis.zscore(keys.load, a.instance) == 5
    await a.get_requests(room(2))
    assert await raw_redis.zscore(keys.load, a.instance) == 3
    await a.get_requests(room(8))
    assert await raw_redis.zscore(keys.load, a.instance) is None  # removed at 0
    for key in (keys.requests, keys.load, keys.alive):
        assert await raw_redis.ttl(key) != -1 or not await raw_redis.exists(key)


async def test_steal_namespaces_ids_and_routes_results_back(
    started: Callable[..., asyncio.Future[GlobalScheduler]],
) -> None:
    a = await started("127.0.0.1:1")
    b = await started("127.0.0.1:2")
    await a.put_requests([req(f"r{i}") for i in range(4)])
    await b.put_requests([req("r0")])  # the same id at another origin is a different request
    [own] = await b.get_requests(room(8))
    assert own.request_id == "r0"
    stolen = await b.get_requests(room(8), timeout=0.5)
    assert len(stolen) == 2  # half of a's queue of 4
    assert {s.request_id.split("@")[0] for s in stolen} == {"r0", "r1"}
    assert all(s.request_id not in ("r0", "r1") for s in stolen)
    assert await a.get_unhandled_request_num() >= 2
    # Every step's output travels back on its own.
    for step in (1, 2, 3):
        await b.put_results([out(s.request_id, step, finished=step == 3) for s in stolen])
    await b.put_results([out("r0", 1, finished=True)])
    got = await collect(a, "r0", "r1")
    assert [o.completion_tokens for o in got["r0"]] == [1, 2, 3]
    assert all(o.request_id == "r0" for o in got["r0"])
    assert [o.completion_tokens for o in got["r1"]] == [1, 2, 3]
    assert [o.completion_tokens for o in await results_until(b, "r0")] == [1]


async def test_no_steal_below_min_load(started: Callable[..., asyncio.Future[GlobalScheduler]]) -> None:
    a = await started("127.0.0.1:1")
    b = await started("127.0.0.1:2")
    await a.put_requests([req("r0"), req("r1")])
    assert await b.get_requests(room(8), timeout=0.3) == []
    await a.put_requests([req("r2")])
    assert len(await b.get_requests(room(8), timeout=2.0)) == 2


async def test_lost_outputs_fail_the_request(started: Callable[..., asyncio.Future[GlobalScheduler]]) -> None:
    a = await started("127.0.0.1:1")
    b = await started("127.0.0.1:2")
    await a.put_requests([req(f"r{i}") for i in range(3)])
    [first, *_] = await b.get_requests(room(8), timeout=2.0)
    await b.put_results([out(first.request_id, 1), out(first.request_id, 3)])  # 2 went missing
    [ok, lost] = await results_until(a, first.request_id.split("@")[0])
    assert ok.error is None and lost.error_code == 503 and "lost" in (lost.error or "")


async def test_abort_drops_late_results(started: Callable[..., asyncio.Future[GlobalScheduler]]) -> None:
    a = await started("127.0.0.1:1")
    b = await started("127.0.0.1:2")
    await a.put_requests([req(f"r{i}") for i in range(3)])
    stolen = await b.get_requests(room(8), timeout=2.0)
    rid = stolen[0].request_id.split("@")[0]
    await a.abort([rid])
    await b.put_results([out(stolen[0].request_id, 1, finished=True)])
    await a.put_results([out("r2", 1, finished=True)])  # something to wait for
    await results_until(a, "r2")
    assert rid not in await a.get_results(timeout=0.3)


async def test_dead_origin_work_is_dropped(
    started: Callable[..., asyncio.Future[GlobalScheduler]], raw_redis: Redis,
) -> None:
    a = await started("127.0.0.1:1")
    b = await started("127.0.0.1:2")
    await a.put_requests([req("r0"), req("r1")])
    keys = a.queues.keys
    for task in a._tasks:  # a crashes: nobody renews its liveness key any more
        task.cancel()
    await raw_redis.delete(keys.alive)
    assert await b.get_requests(room(8), timeout=0.5) == []
    assert await raw_redis.llen(keys.requests) == 0
    assert await raw_redis.zscore(keys.load, a.instance) is None


async def test_ttl_fails_queued_work_and_keys_expire(
    started: Callable[..., asyncio.Future[GlobalScheduler]], raw_redis: Redis,
) -> None:
    a = await started("127.0.0.1:1", ttl=1)
    await a.put_requests([req("r0")])
    [expired] = await results_until(a, "r0")
    assert expired.error_code == 503 and "ttl" in (expired.error or "")
    keys = a.queues.keys
    end = time.monotonic() + 10
    while await raw_redis.exists(keys.requests, keys.load):
        assert time.monotonic() < end, "abandoned keys did not expire"
        await asyncio.sleep(0.05)


async def test_stealing_across_shards(started: Callable[..., asyncio.Future[GlobalScheduler]]) -> None:
    names = [f"127.0.0.1:{port}" for port in range(1, 40)]
    a_name = names[0]
    b_name = next(n for n in names if shard_of(n, 4) != shard_of(a_name, 4))
    a = await started(a_name, load_shards_num=4)
    b = await started(b_name, load_shards_num=4)
    assert a.queues.keys.load != b.queues.keys.load
    await a.put_requests([req(f"r{i}") for i in range(4)])
    assert len(await b.get_requests(room(8), timeout=2.0)) == 2


async def test_redis_restart_fails_lost_work_and_health_recovers(
    started: Callable[..., asyncio.Future[GlobalScheduler]], redis_server: RedisServer,
) -> None:
    a = await started("127.0.0.1:1", alive_ttl=0.9, lost_timeout=0.5)
    await a.put_requests([req("r0")])
    redis_server.stop()
    end = time.monotonic() + 10
    while a.health() is None:
        assert time.monotonic() < end
        await asyncio.sleep(0.05)
    assert str(redis_server.port) in (a.health() or "")
    [rejected] = await a.put_requests([req("r1")])
    assert rejected.kind is RejectionKind.UNAVAILABLE and "unreachable" in rejected.message
    redis_server.start()
    [lost] = await results_until(a, "r0")
    assert lost.error_code == 503 and "Redis" in (lost.error or "")
    while a.health() is not None:
        assert time.monotonic() < end
        await asyncio.sleep(0.05)
    assert await a.put_requests([req("r2")]) == []
    assert [r.request_id for r in await a.get_requests(room(8))] == ["r2"]


async def test_unreachable_redis_is_a_startup_error() -> None:
    port = free_port()
    scheduler = GlobalScheduler(GlobalConfig(port=port), SchedulerContext("h:1", "h", 1, 16))
    with pytest.raises(StartupError, match=f"127.0.0.1:{port}"):
        await scheduler.start()
    await scheduler.link.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lens=st.lists(st.integers(1, 300), min_size=1, max_size=8),
    available=st.integers(0, 40), reserved=st.integers(0, 3), batch=st.integers(1, 8),
)
async def test_lua_admission_matches_python(
    make_scheduler: Make, lens: list[int], available: int, reserved: int, batch: int,
) -> None:
    a = make_scheduler("127.0.0.1:1")
    await a.queues.reset()
    await a.put_requests([req(f"r{i}", n) for i, n in enumerate(lens)])
    requests = [req(f"r{i}", n) for i, n in enumerate(lens)]
    capacity = Capacity(available, 16, reserved, 2048, batch)
    expected = capacity.admissible(requests)
    _, items = await a.queues.take(a.instance, capacity)
    assert len(items) == expected
    await a.link.close()
