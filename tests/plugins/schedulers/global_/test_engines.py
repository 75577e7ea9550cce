"""Several real ``fdcore engine --model sim`` processes sharing one Redis through ``global``."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from openai import OpenAI

from tests.engine.conftest import Engine, wait_until
from tests.plugins.schedulers.global_.conftest import RedisServer, generated

StartEngines = Callable[..., list[Engine]]
MAX_TOKENS = 24


def prompts(n: int) -> list[str]:
    return [f"prompt number {i} " * (1 + i % 3) for i in range(n)]


def complete_all(engine: Engine, texts: list[str], **fields: Any) -> list[tuple[int, Any]]:
    """Send every prompt to ``engine`` at once; return each ``(status, body)`` in order."""
    with ThreadPoolExecutor(len(texts)) as pool:
        return list(pool.map(lambda p: engine.request(
            "POST", "/v1/completions",
            {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}), texts))


def reference(engine: Engine, text: str) -> str:
    return str(engine.complete(text, max_tokens=MAX_TOKENS, temperature=0)["choices"][0]["text"])


def test_skewed_load_is_served_by_every_instance(start_engines: StartEngines) -> None:
    engines = start_engines(3)
    texts = prompts(18)
    answers = complete_all(engines[0], texts)
    assert all(status == 200 for status, _ in answers), answers
    assert all(generated(e) > 0 for e in engines), [generated(e) for e in engines]
    # Each client got its own answer: the one its prompt gives when run alone.
    for text, (_, body) in zip(texts[:4], answers[:4], strict=True):
        assert body["choices"][0]["text"] == reference(engines[1], text)
        assert body["usage"]["completion_tokens"] == MAX_TOKENS


def test_streams_of_stolen_requests_arrive_token_by_token(start_engines: StartEngines) -> None:
    engines = start_engines(2)
    client = OpenAI(base_url=engines[0].url + "/v1", api_key="unused", max_retries=0)
    texts = prompts(8)

    def stream(text: str) -> tuple[int, str]:
        chunks = list(client.completions.create(model="sim", prompt=text, max_tokens=MAX_TOKENS,
                                                temperature=0, stream=True))
        return len(chunks), "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(len(texts)) as pool:
        streamed = list(pool.map(stream, texts))
    assert generated(engines[1]) > 0
    for text, (chunks, joined) in zip(texts, streamed, strict=True):
        assert chunks >= MAX_TOKENS // 2  # per-step chunks, not one lump at the end
        assert joined == reference(engines[1], text)


def test_load_shards(start_engines: StartEngines) -> None:
    engines = start_engines(3, "--scheduler-load-shards-num", "4")
    answers = complete_all(engines[0], prompts(18))
    assert all(status == 200 for status, _ in answers)
    assert all(generated(e) > 0 for e in engines)


def test_killed_instance_queued_work_is_drained(
    start_engines: StartEngines, redis_server: RedisServer,
) -> None:
    victim, survivor = start_engines(2)
    client = redis_server.client()

    def send() -> None:
        with contextlib.suppress(OSError):  # the victim dies under its clients
            complete_all(victim, prompts(10), max_tokens=200)

    threading.Thread(target=send, daemon=True).start()
    key = f"{{default.0}}.req.127.0.0.1:{victim.port}"
    wait_until(lambda: client.llen(key) > 0)
    victim.proc.kill()
    # Its liveness key expires (3 s here), then the survivor drops what is left: its
    # clients went away with it, so nobody could receive the answers.
    wait_until(lambda: client.llen(key) == 0 and client.zscore("{default.0}.load",
               f"127.0.0.1:{victim.port}") is None, timeout=60)
    assert survivor.complete("still serving", max_tokens=3)["usage"]["completion_tokens"] == 3
    client.close()


def test_redis_restart_mid_run(start_engines: StartEngines, redis_server: RedisServer) -> None:
    engines = start_engines(2)
    results: list[tuple[int, Any]] = []
    runner = threading.Thread(
        target=lambda: results.extend(complete_all(engines[0], prompts(8), max_tokens=150)))
    runner.start()
    wait_until(lambda: generated(engines[1]) > 0)
    redis_server.stop()
    wait_until(lambda: engines[0].request("GET", "/health")[0] == 503)
    status, body = engines[0].request("GET", "/health")
    assert str(redis_server.port) in body["detail"]
    redis_server.start()
    wait_until(lambda: all(e.request("GET", "/health")[0] == 200 for e in engines))
    runner.join(timeout=120)
    assert not runner.is_alive(), "a request accepted before the restart hangs"
    for status, body in results:
        if status == 200:
            assert body["usage"]["completion_tokens"] == 150
        else:
            assert status == 503 and "Redis" in body["error"]["message"], body
    assert engines[0].complete("after the restart", max_tokens=3)["usage"]["completion_tokens"] == 3
