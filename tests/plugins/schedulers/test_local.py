"""The ``local`` scheduler plugin in process: its contract with the engine."""

from __future__ import annotations

import asyncio

import pytest

import fdcore
from fdcore.errors import StartupError
from fdcore.plugins import load_plugins
from fdcore.registry import Register
from fdcore.types import (
    Capacity,
    EngineRequest,
    Rejection,
    RejectionKind,
    RequestOutput,
    SamplingParams,
    SchedulerContext,
)


def make(max_size: int = -1, ttl: float = 900.0):  # type: ignore[no-untyped-def]
    component = load_plugins("default").registry.get("scheduler", "local")
    config = component.cls.Config.model_validate({"max-size": max_size, "ttl": ttl})
    return component.cls(config, SchedulerContext("test", "127.0.0.1", 1, 4))


def req(rid: str, prompt_len: int = 4) -> EngineRequest:
    return EngineRequest(rid, [1] * prompt_len, SamplingParams(), arrival_time=0.0)


def room(available: int = 100, reserved: int = 0, batch: int = 1) -> Capacity:
    """Blocks of 4 tokens and a token budget of 2048."""
    return Capacity(available, 4, reserved, 2048, batch)


async def test_max_size_rejects_the_whole_call() -> None:
    sched = make(max_size=2)
    assert await sched.put_requests([req("a")]) == []
    outcome = await sched.put_requests([req("b"), req("c")])
    reason = "Exceeding the max length of the local scheduler (max_size=2)"
    full = RejectionKind.QUEUE_FULL
    assert outcome == [Rejection("b", full, reason), Rejection("c", full, reason)]


async def test_duplicate_ids_are_rejected_until_finished() -> None:
    sched = make()
    await sched.put_requests([req("a")])
    assert await sched.put_requests([req("a"), req("b")]) == [
        Rejection("a", RejectionKind.DUPLICATE_ID, "duplicated request_id: a"),
    ]
    assert len(await sched.get_requests(room(batch=1))) == 1
    await sched.put_results([RequestOutput("a", [5], finished=True)])
    assert await sched.get_results() == {"a": [RequestOutput("a", [5], finished=True)]}
    assert await sched.put_requests([req("a")]) == []


@pytest.mark.parametrize(
    ("available", "reserved", "prompts", "taken"),
    [
        (10, 1, [8, 8], 2),  # 2+1 and 2+1 blocks fit in 10
        (10, 2, [16, 16, 4], 1),  # 4+2, then 12 > 10: stop at the first that does not fit
        (5, 2, [16], 1),  # 4+2 > 5, but the first is taken when its prompt alone fits
        (3, 3, [4], 0),  # nothing above the reserve
        (5, 1, [40], 0),  # even the first prompt does not fit
    ],
)
async def test_admission_follows_fastdeploys_rule(
    available: int, reserved: int, prompts: list[int], taken: int
) -> None:
    requests = [req(f"r{i}", n) for i, n in enumerate(prompts)]
    capacity = room(available, reserved, batch=len(prompts))
    assert capacity.admissible(requests) == taken
    assert capacity.empty == (available <= reserved)
    sched = make()
    await sched.put_requests(requests)
    got = await sched.get_requests(capacity)
    assert len(got) == taken
    assert await sched.get_unhandled_request_num() == len(prompts) - taken


async def test_ttl_evicts_without_max_size_and_tells_the_client() -> None:
    sched = make(ttl=0.05)
    await sched.start()
    try:
        await sched.put_requests([req("old")])
        results = await sched.get_results(timeout=5.0)
        [output] = results["old"]
        assert output.finished and output.error_code == 503 and "ttl" in (output.error or "")
        assert await sched.get_unhandled_request_num() == 0
    finally:
        await sched.stop()


async def test_get_requests_waits_for_work() -> None:
    sched = make()
    waiter = asyncio.create_task(sched.get_requests(room(batch=4), timeout=5.0))
    await asyncio.sleep(0)
    await sched.put_requests([req("late")])
    assert [r.request_id for r in await waiter] == ["late"]


async def test_a_cancellation_as_work_arrives_is_not_lost() -> None:
    # asyncio.wait_for on Python 3.11 returned the event's result here instead of raising.
    sched = make()
    waiters = [asyncio.create_task(sched.get_requests(room(batch=4), timeout=5.0)),
               asyncio.create_task(sched.get_results(timeout=5.0))]
    for _ in range(3):
        await asyncio.sleep(0)
    await sched.put_requests([req("late")])
    await sched.put_results([RequestOutput("late", [1])])
    for waiter in waiters:
        waiter.cancel()
    for waiter in waiters:
        with pytest.raises(asyncio.CancelledError):
            await waiter


async def test_abort_drops_queued_work_and_results() -> None:
    sched = make()
    await sched.put_requests([req("a"), req("b")])
    await sched.abort(["a"])
    await sched.put_results([RequestOutput("a", [1])])
    assert [r.request_id for r in await sched.get_requests(room(batch=4))] == ["b"]
    assert await sched.get_results() == {}


class _Shadow:
    """Registers a second scheduler called ``local`` (a name clash)."""

    @staticmethod
    @fdcore.hookimpl
    def fdcore_register_schedulers(register: Register) -> None:
        component = load_plugins("default").registry.get("scheduler", "local")
        register.add_scheduler(component.cls)


def test_fdcore_register_schedulers_registers_local_and_rejects_a_clash() -> None:
    component = load_plugins("default").registry.get("scheduler", "local")
    assert component.plugin == "local"
    assert set(component.cls.Config.model_fields) == {"max_size", "ttl"}
    with pytest.raises(StartupError, match="'shadow'"):
        load_plugins("default", extra=[("shadow", _Shadow())])
