"""Splitwise mode end to end: a real router in front of prefill and decode sim engines (real
processes, KV over ipc or tcp on loopback), with the failure paths a client can meet."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from fdcore.testing import free_port
from fdcore.testing.cluster import EngineFactory, EngineHandle
from tests.router.conftest import Router, RouterFactory, wait_until

HOLD = ("--pd-hold-secs", "2", "--pd-first-contact-secs", "4")
SLOW_DECODE = {"decode-seconds-per-step": 0.03}


def pd_engines(engines: EngineFactory, router: Router, role: str, n: int = 1,
               protocols: str = "ipc,tcp", profile: dict[str, Any] | None = None,
               ) -> list[EngineHandle]:
    """``n`` sim engines of ``role`` registered with ``router``."""
    started = []
    for _ in range(n):
        flags = ["--splitwise-role", role, "--pd-comm-port", str(free_port()),
                 "--cache-transfer-protocol", protocols, *HOLD]
        started += engines(1, router=router, flags=flags, profile=profile)
    return started


def splitwise_router(router: RouterFactory, **sections: Any) -> Router:
    server = {"splitwise": True, **sections.pop("server", {})}
    scheduler = {"prefill-policy": "round_robin", "decode-policy": "round_robin",
                 **sections.pop("scheduler", {})}
    return router(server=server, scheduler=scheduler, **sections)


async def metrics(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as resp:
        return await resp.text()


def total(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$"
    return sum(float(value) for found, value in re.findall(pattern, text, re.M)
               if labels in found)


async def at_baseline(engine: EngineHandle) -> bool:
    """No block used or held for a hand-off on this engine."""
    try:
        text = await metrics(engine.url)
    except aiohttp.ClientError:
        return False
    return (total(text, "fdcore_kv_held_blocks") == 0
            and total(text, "fastdeploy:available_gpu_block_num")
            == total(text, "fastdeploy:max_gpu_block_num"))


async def router_idle(r: Router) -> bool:
    """Every instance's in-flight counters back at zero."""
    _, body = await r.get("/registered")
    rows = body["prefill"] + body["decode"] + body["mixed"]
    return all(row["in_flight_requests"] == 0 and row["in_flight_tokens"] == 0 for row in rows)


async def settled(r: Router, *engines: EngineHandle) -> None:
    async def check() -> bool:
        return await router_idle(r) and all([await at_baseline(e) for e in engines])
    await wait_until(check, timeout=30)


async def complete(r: Router, body: dict[str, Any], **headers: str) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as s, s.post(f"{r.url}/v1/completions", json=body,
                                                    headers=headers) as resp:
        if body.get("stream"):
            return resp.status, await resp.read(), resp.headers
        return resp.status, await resp.json(), resp.headers


def texts(events: bytes) -> str:
    """The text of an SSE completions stream."""
    out = []
    for data in re.findall(rb"^data: (.*)$", events, re.M):
        if data != b"[DONE]":
            event = orjson.loads(data)
            out += [c.get("text", "") for c in event.get("choices", [])]
    return "".join(out)


async def test_pair_answers_like_a_mixed_engine(router: RouterFactory,
                                                engines: EngineFactory) -> None:
    r = splitwise_router(router)
    (p,) = pd_engines(engines, r, "prefill")
    (d,) = pd_engines(engines, r, "decode")
    (mixed,) = engines(1)
    await r.wait_healthy(2)
    prompt = "Tell me about the prefill and decode split. " * 8
    body = {"model": "sim", "prompt": prompt, "max_tokens": 24, "temperature": 0}
    async with aiohttp.ClientSession() as s, s.post(f"{mixed.url}/v1/completions",
                                                    json=body) as resp:
        expected = (await resp.json())["choices"][0]["text"]

    status, answer, headers = await complete(r, body)
    assert status == 200, answer
    assert answer["choices"][0]["text"] == expected
    assert answer["usage"]["completion_tokens"] == 24
    assert headers["x-router-prefill-url"] == p.url
    assert headers["x-router-decode-url"] == d.url
    status, events, _ = await complete(r, {**body, "stream": True})
    assert status == 200 and events.endswith(b"data: [DONE]\n\n")
    assert texts(events) == expected
    # The decode engine received the prompt's KV from the prefill engine (no local prefill).
    assert total(await metrics(d.url), "fdcore_kv_transfer_bytes_total", 'direction="received"') > 0

    client = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key="unused", max_retries=0)
    try:
        chat = await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": prompt}], max_tokens=8,
            temperature=0, stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in chat if c.choices]
        assert len("".join(pieces)) > 0
    finally:
        await client.close()
    text = await metrics(r.url)
    assert total(text, "inference_requests_total", f'prefill_worker="{p.url}"') == 3
    assert total(text, "fdcore_router_pd_decisions_total", 'decision="disaggregated"') == 3
    await settled(r, p, d)


async def test_prefill_down_retries_on_another_pair_then_503(
    router: RouterFactory, engines: EngineFactory
) -> None:
    # Slow health rounds: the router still takes the dead prefill engine for healthy.
    r = splitwise_router(router, manager={"health-check-interval-secs": 60})
    p1, p2 = pd_engines(engines, r, "prefill", 2)
    (d,) = pd_engines(engines, r, "decode")
    await r.wait_healthy(3)
    p1.proc.kill()
    body = {"model": "sim", "prompt": "retry me " * 20, "max_tokens": 4}
    for _ in range(3):  # round robin offers the dead one at least once
        status, answer, headers = await complete(r, body)
        assert status == 200, answer
        assert headers["x-router-prefill-url"] == p2.url
    text = await metrics(r.url)
    assert total(text, "fdcore_router_pd_reschedules_total", 'side="prefill"') >= 1
    p2.proc.kill()
    status, answer, _ = await complete(r, body)
    assert status == 503, answer
    assert "prefill" in answer["error"]["message"]
    await settled(r, d)


async def test_decode_killed_mid_stream_ends_the_stream_with_an_error(
    router: RouterFactory, engines: EngineFactory
) -> None:
    r = splitwise_router(router)
    (p,) = pd_engines(engines, r, "prefill")
    (d,) = pd_engines(engines, r, "decode", profile=SLOW_DECODE)
    await r.wait_healthy(2)
    body = {"model": "sim", "prompt": "stream then die " * 10, "max_tokens": 400,
            "stream": True}
    async with aiohttp.ClientSession() as s, s.post(f"{r.url}/v1/completions",
                                                    json=body) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert b'"text"' in first
        d.proc.kill()
        rest = await resp.content.read()
    assert b'data: {"error"' in rest and b"failed mid-stream" in rest
    await settled(r, p)


async def test_abort_and_disconnect_free_blocks_on_both(
    router: RouterFactory, engines: EngineFactory
) -> None:
    r = splitwise_router(router)
    # A slow prefill: the abort lands while the hand-off is still under way.
    (p,) = pd_engines(engines, r, "prefill", profile={"prefill-seconds-per-token": 0.002})
    (d,) = pd_engines(engines, r, "decode", profile=SLOW_DECODE)
    await r.wait_healthy(2)
    body = {"model": "sim", "prompt": "abort me " * 200, "max_tokens": 400, "stream": True}
    async with aiohttp.ClientSession() as s:
        # The router holds a stream's head back until the first token (a failed hand-off
        # can still be retried until then), so the request is under way before it answers.
        sent = asyncio.ensure_future(s.post(f"{r.url}/v1/completions", json=body,
                                            headers={"x-request-id": "pd-abort-1"}))

        async def prefilling() -> bool:
            return total(await metrics(p.url), "fastdeploy:num_requests_running") > 0
        await wait_until(prefilling)
        status, result, _ = await r.post("/v1/abort_requests", {"req_ids": ["pd-abort-1"]})
        assert status == 200, result
        assert {p.url, d.url} == set(result["instances"])
        assert result["not_found"] == []
        resp = await sent
        rest = await resp.content.read()
        resp.close()
        assert resp.status == 200 and b'"finish_reason":"abort"' in rest, rest
        await settled(r, p, d)

        # A client that leaves mid-stream frees the blocks on both as well.
        resp = await s.post(f"{r.url}/v1/completions", json={**body, "prompt": "leave " * 40},
                            headers={"x-request-id": "pd-gone-1"})
        assert resp.status == 200
        assert b'"text"' in await resp.content.readuntil(b"\n\n")
        resp.close()
    await settled(r, p, d)


async def test_short_prompts_skip_the_hand_off(router: RouterFactory,
                                              engines: EngineFactory) -> None:
    r = splitwise_router(router, scheduler={"pd-min-prompt-tokens": 500,
                                            "pd-chars-per-token": 1})
    (p,) = pd_engines(engines, r, "prefill")
    (d,) = pd_engines(engines, r, "decode")
    await r.wait_healthy(2)
    served = set()
    for _ in range(2):  # round_robin over the decode and prefill instances: one each
        status, answer, headers = await complete(r, {"model": "sim", "prompt": "short",
                                                     "max_tokens": 4})
        assert status == 200, answer
        assert "x-router-prefill-url" not in headers
        served.add(headers["x-router-decode-url"])
    assert served == {p.url, d.url}
    for e in (p, d):
        assert total(await metrics(e.url), "fdcore_kv_transfer_bytes_total") == 0
    status, answer, headers = await complete(r, {"model": "sim", "prompt": "long " * 120,
                                                 "max_tokens": 4})
    assert status == 200, answer
    assert headers["x-router-prefill-url"] == p.url
    text = await metrics(r.url)
    assert total(text, "fdcore_router_pd_decisions_total",
                 'decision="alone",reason="short_prompt"') == 2
    assert total(text, "fdcore_router_pd_decisions_total", 'decision="disaggregated"') == 1
    await settled(r, p, d)


async def test_a_pair_without_a_common_transport_is_refused_clearly(
    router: RouterFactory, engines: EngineFactory
) -> None:
    r = splitwise_router(router)
    (p,) = pd_engines(engines, r, "prefill", protocols="tcp")
    (d,) = pd_engines(engines, r, "decode", protocols="ipc")
    await r.wait_healthy(2)
    status, answer, _ = await complete(r, {"model": "sim", "prompt": "x", "max_tokens": 2})
    assert status == 503
    message = answer["error"]["message"]
    assert "no KV transfer protocol in common" in message and p.url in message
    await settled(r, p, d)


@pytest.mark.parametrize("stream", [False, True])
async def test_decode_refusal_is_retried_then_reported(
    router: RouterFactory, engines: EngineFactory, stream: bool
) -> None:
    # D's pool holds one such request: while a first one decodes, a second finds no room,
    # D refuses the reservation (PD Error), the router retries, then says so.
    r = splitwise_router(router, proxy={"preempt-retry-count": 1})
    (p,) = pd_engines(engines, r, "prefill")
    (d,) = engines(1, router=r, profile={"decode-seconds-per-step": 0.05},
                   flags=["--splitwise-role", "decode", "--pd-comm-port", str(free_port()),
                          "--cache-transfer-protocol", "ipc,tcp", *HOLD,
                          "--num-gpu-blocks", "12"])
    await r.wait_healthy(2)
    body = {"model": "sim", "prompt": "fills d " * 75, "max_tokens": 100, "stream": True}
    async with aiohttp.ClientSession() as s:
        first = await s.post(f"{r.url}/v1/completions", json=body)
        assert first.status == 200
        assert b'"text"' in await first.content.readuntil(b"\n\n")
        status, answer, _ = await complete(r, {**body, "prompt": "no room " * 75,
                                                "stream": stream})
        assert status == 503, answer
        if isinstance(answer, bytes):
            answer = orjson.loads(answer)
        message = answer["error"]["message"]
        assert "failed 2 times" in message and "PD Error" in message, message
        assert (await first.content.read()).endswith(b"data: [DONE]\n\n")
    text = await metrics(r.url)
    # Both halves report the refusal (D to the router, P after D's reject); whichever answer
    # comes first names the side, so only the sum is fixed.
    assert total(text, "fdcore_router_pd_reschedules_total") == 2
    await settled(r, p, d)


async def test_fastdeploy_launch_lines(router: RouterFactory, engines: EngineFactory) -> None:
    # FastDeploy's disaggregated-deployment lines: `router.launch --port P --splitwise` and
    # api_server with its PD flags (ports, queue ports, protocols). ipc only, so without
    # --rdma-comm-ports: this machine has no RDMA NIC.
    r = router(args=["--splitwise", "--preempt-retry-count", "3",
                     "--request-timeout-secs", "1800"])
    flags = {}
    for role in ("prefill", "decode"):
        ports = [str(free_port()) for _ in range(4)]
        flags[role] = ["--metrics-port", ports[0], "--engine-worker-queue-port", ports[1],
                       "--cache-queue-port", ports[2], "--max-model-len", "32768",
                       "--splitwise-role", role, "--cache-transfer-protocol", "ipc",
                       "--pd-comm-port", ports[3],
                       "--tensor-parallel-size", "1"]
    (p,) = engines(1, router=r, flags=flags["prefill"])
    (d,) = engines(1, router=r, flags=flags["decode"])
    await r.wait_healthy(2)
    _, registered = await r.get("/registered")
    assert [i["url"] for i in registered["prefill"]] == [p.url]
    assert [i["url"] for i in registered["decode"]] == [d.url]
    status, health = await r.get("/health_generate")
    assert status == 200 and {i["role"] for i in health["instances"]} == {"prefill", "decode"}
    status, answer, headers = await complete(r, {"model": "sim", "prompt": "hi " * 30,
                                                 "max_tokens": 5})
    assert status == 200 and answer["usage"]["completion_tokens"] == 5
    assert headers["x-router-prefill-url"] == p.url
    await settled(r, p, d)


async def test_cache_aware_picks_the_prefill_instance(router: RouterFactory,
                                                      engines: EngineFactory) -> None:
    # cache_aware as the prefill policy: the same prompt prefix goes back to the same P.
    r = splitwise_router(router, scheduler={"prefill-policy": "cache_aware"})
    pd_engines(engines, r, "prefill", 2)
    (d,) = pd_engines(engines, r, "decode")
    await r.wait_healthy(3)
    prompt = "a long shared system prompt that the prefill cache keeps " * 6
    chosen = set()
    for i in range(3):
        status, answer, headers = await complete(r, {"model": "sim", "max_tokens": 2,
                                                     "prompt": f"{prompt} question {i}"})
        assert status == 200, answer
        assert headers["x-router-decode-url"] == d.url
        chosen.add(headers["x-router-prefill-url"])
    assert len(chosen) == 1
    text = await metrics(r.url)
    assert total(text, "fdcore_router_selections_total", 'policy="cache_aware",role="prefill"') == 3
