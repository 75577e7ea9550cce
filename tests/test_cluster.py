"""Router and engines together: engines register themselves, the router routes to them."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import openai
import pytest

from fdcore.engine.runners.torch.fetch import SMOLLM2_FILE, default_models_dir
from fdcore.testing.cluster import EngineFactory, RouterFactory, wait_until

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


async def test_engines_register_and_serve_through_the_router(
    router: RouterFactory, engines: EngineFactory
) -> None:
    r = router(scheduler={"policy": "request_num"})
    engines(2, router=r)
    await r.wait_healthy(2)
    assert {w["worker_type"] for w in await r.instances()} == {"mixed"}
    client = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0)
    try:
        served = set()
        for _ in range(4):
            completion = await client.completions.with_raw_response.create(
                model="sim", prompt="a shared prompt for the engines", max_tokens=4
            )
            served.add(completion.headers["x-router-instance-url"])
            body = completion.parse()
            assert body.usage is not None and body.usage.completion_tokens == 4
        assert len(served) == 2
        stream = await client.chat.completions.create(
            model="sim", messages=QUESTION, max_tokens=5, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    finally:
        await client.close()


async def test_a_stopped_engine_leaves_selection(
    router: RouterFactory, engines: EngineFactory
) -> None:
    r = router()
    first, _ = engines(2, router=r)
    await r.wait_healthy(2)
    first.proc.stop()

    async def one_healthy() -> bool:
        return sum(1 for w in await r.instances() if w["healthy"]) == 1

    await wait_until(one_healthy)
    for _ in range(3):
        status, body, _ = await r.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 200, body


def _smollm2() -> Path:
    path = default_models_dir() / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} is absent: run `fdcore models pull` (the README's commands do)")
    return path


async def test_smollm2_answers_paris_through_the_router(
    router: RouterFactory, engines: EngineFactory
) -> None:
    model = _smollm2()
    r = router()
    engines(1, router=r, model=str(model), flags=["--cpu-threads", "1"])
    await r.wait_healthy(1, timeout=120)
    client = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0)
    try:
        answer = await client.chat.completions.create(
            model=model.stem, messages=QUESTION, max_tokens=16, temperature=0
        )
        assert "Paris" in (answer.choices[0].message.content or "")
        stream = await client.chat.completions.create(
            model=model.stem, messages=QUESTION, max_tokens=16, temperature=0, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert "Paris" in text
    finally:
        await client.close()


async def test_abort_through_the_router_reaches_the_engine(
    router: RouterFactory, engines: EngineFactory
) -> None:
    r = router()
    (engine,) = engines(1, router=r)
    await r.wait_healthy(1)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            f"{r.url}/v1/completions", headers={"x-request-id": "long-1"},
            json={"prompt": "hi", "max_tokens": 5000, "stream": True},
        )
        await resp.content.readuntil(b"\n\n")  # generation has started
        status, body, _ = await r.post("/v1/abort_requests", {"req_ids": ["long-1", "nope"]})
        assert status == 200
        assert [(a["request_id"], a["instance"]) for a in body["aborted"]] == [
            ("long-1", engine.url)
        ]
        assert body["not_found"] == ["nope"]
        rest = await asyncio.wait_for(resp.content.read(), 60)
        resp.release()
    assert b'"finish_reason":"abort"' in rest


async def test_client_disconnect_through_the_router_frees_the_engine(
    router: RouterFactory, engines: EngineFactory
) -> None:
    r = router()
    (engine,) = engines(1, router=r)
    await r.wait_healthy(1)

    async def engine_gauges() -> tuple[float, float]:
        async with aiohttp.ClientSession() as s, s.get(f"{engine.url}/metrics") as resp:
            text = await resp.text()
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith("fastdeploy:") and " " in line}
        return (values["fastdeploy:num_requests_running"],
                values["fastdeploy:available_gpu_block_num"])

    _, free_at_start = await engine_gauges()
    async def running() -> bool:
        return (await engine_gauges())[0] == 1

    async def released() -> bool:
        return await engine_gauges() == (0, free_at_start)

    body = {"prompt": "hi", "max_tokens": 5000}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{r.url}/v1/completions", json={**body, "stream": True})
        await resp.content.readuntil(b"\n\n")
        resp.close()  # the client goes away mid-stream
    await wait_until(released)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(f"{r.url}/v1/completions", json=body))
        await wait_until(running)
        task.cancel()  # the client goes away before the answer
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await wait_until(released)
