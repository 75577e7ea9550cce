"""More concurrent callers than pooled Redis connections: they wait their turn, none fails."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fdcore_plugins.schedulers.global_ import GlobalScheduler
from redis.asyncio import Redis

from fdcore.types import EngineRequest, SamplingParams
from tests.engine.conftest import Engine
from tests.plugins.schedulers.global_.test_engines import complete_all, prompts

CONCURRENT = 160  # redis-py's default pool failed past 100 with "Too many connections"


async def test_concurrent_enqueues_share_a_small_pool(
    make_scheduler: Callable[..., GlobalScheduler], raw_redis: Redis
) -> None:
    scheduler = make_scheduler("127.0.0.1:1", redis_max_connections=2)
    await scheduler.start()
    try:
        requests = [EngineRequest(f"r{i}", [1, 2, 3], SamplingParams(), time.time())
                    for i in range(CONCURRENT)]
        answers = await asyncio.gather(*(scheduler.put_requests([r]) for r in requests))
        assert answers == [[] for _ in requests]
        assert await raw_redis.llen(scheduler.queues.keys.requests) == CONCURRENT
        # Two clients of at most 2 connections each, plus this test's own.
        assert len(await raw_redis.client_list()) <= 5
    finally:
        await scheduler.stop()


def test_one_engine_answers_every_concurrent_request(
    start_engines: Callable[..., list[Engine]],
) -> None:
    (engine,) = start_engines(1, "--scheduler-redis-max-connections", "4")
    answers = complete_all(engine, prompts(CONCURRENT), max_tokens=2)
    assert [status for status, _ in answers] == [200] * CONCURRENT, answers
    assert all(body["usage"]["completion_tokens"] == 2 for _, body in answers)
