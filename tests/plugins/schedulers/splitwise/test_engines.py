"""Prefill, decode and mixed sim engines paired by the ``splitwise`` scheduler through a real
redis-server: no router; a client may call any instance."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai import OpenAI

from tests.engine.conftest import Engine, wait_until
from tests.engine.disagg.conftest import write_profile
from tests.engine.disagg.pd_client import at_baseline, held_blocks, received_bytes
from tests.plugins.schedulers.global_.conftest import RedisServer
from tests.plugins.schedulers.splitwise.conftest import EXPIRE_MS, StartSplitwise

MAX_TOKENS = 12
# The longest a failure may take to reach the client: an instance's news expires, the watchdog
# ticks, hand-off deadlines (first contact 4 s, holds 2 s, quarantine 6 s) pass.
FAILURE_SECS = 30.0


def prompts(n: int) -> list[str]:
    return [f"splitwise prompt {i} about something " * (1 + i % 4) for i in range(n)]


def registered(redis_server: RedisServer, n: int, topic: str = "test") -> None:
    client = redis_server.client()
    wait_until(lambda: client.hlen(f"{topic}.cluster") == n)
    client.close()


def unloaded(redis_server: RedisServer) -> bool:
    """Every instance publishes a load of 0 (nothing booked on any executor)."""
    client = redis_server.client()
    entries = client.hgetall("test.cluster")
    client.close()
    return bool(entries) and all(orjson.loads(v)["load"] == 0 for v in entries.values())


def complete(engine: Engine, prompt: str, **fields: Any) -> tuple[int, Any]:
    return engine.request("POST", "/v1/completions",
                          {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                           "ignore_eos": True, **fields})


def open_stream(engine: Engine, prompt: str, max_tokens: int = MAX_TOKENS) -> Any:
    """A greedy streamed completion through the official ``openai`` client."""
    client = OpenAI(base_url=engine.url + "/v1", api_key="unused", max_retries=0,
                    timeout=FAILURE_SECS)
    return client.completions.create(model="sim", prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, stream=True,
                                     extra_body={"ignore_eos": True})


@pytest.fixture
def reference(start_engine: Callable[..., Engine]) -> Callable[[str], str]:
    """What one mixed engine (local scheduler) answers for a prompt."""
    engine = start_engine("--block-size", "16", "--num-gpu-blocks", "256")
    cache: dict[str, str] = {}

    def text(prompt: str) -> str:
        if prompt not in cache:
            status, body = complete(engine, prompt)
            assert status == 200, body
            cache[prompt] = body["choices"][0]["text"]
        return cache[prompt]

    return text


def test_one_pair_answers_clients_of_either(
    start_splitwise: StartSplitwise, redis_server: RedisServer,
    reference: Callable[[str], str],
) -> None:
    p = start_splitwise("prefill")
    d = start_splitwise("decode")
    registered(redis_server, 2)
    for engine in (p, d):
        for prompt in prompts(3):
            status, body = complete(engine, prompt)
            assert status == 200, body
            assert body["choices"][0]["text"] == reference(prompt)
            assert body["usage"]["completion_tokens"] == MAX_TOKENS
        chunks = list(open_stream(engine, prompts(1)[0]))
        assert len(chunks) >= MAX_TOKENS // 2  # token by token, not one lump
        assert "".join(c.choices[0].text for c in chunks if c.choices) == reference(prompts(1)[0])
    assert received_bytes(d) > 0  # the KV cache moved; D recomputed nothing
    assert d.metric("fastdeploy:generation_tokens_total") > p.metric(
        "fastdeploy:generation_tokens_total")
    wait_until(lambda: at_baseline(p) and at_baseline(d) and unloaded(redis_server))


def test_two_of_each_and_a_mixed_instance(
    start_splitwise: StartSplitwise, redis_server: RedisServer,
    reference: Callable[[str], str],
) -> None:
    engines = [start_splitwise(role) for role in ("prefill", "prefill", "decode", "decode")]
    mixed = start_splitwise("mixed")
    registered(redis_server, 5)
    texts = prompts(20)
    targets = [*engines, mixed] * 4
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda pair: complete(pair[0], pair[1]),
                                zip(targets, texts, strict=True)))
    for text, (status, body) in zip(texts, answers, strict=True):
        assert status == 200, body
        assert body["choices"][0]["text"] == reference(text)
    decodes = engines[2:]
    assert all(received_bytes(d) > 0 for d in decodes), [received_bytes(d) for d in decodes]
    wait_until(lambda: all(at_baseline(e) for e in [*engines, mixed]) and unloaded(redis_server))


def test_every_key_expires(start_splitwise: StartSplitwise, redis_server: RedisServer) -> None:
    p = start_splitwise("prefill")
    start_splitwise("decode")
    registered(redis_server, 2)
    assert complete(p, "keys")[0] == 200
    client = redis_server.client()
    keys = [k.decode() for k in client.keys("test.*")]
    assert "test.cluster" in keys
    assert all(client.ttl(k) > 0 for k in keys), {k: client.ttl(k) for k in keys}
    client.close()


def test_no_decode_instance_is_a_clear_503(
    start_splitwise: StartSplitwise, redis_server: RedisServer,
) -> None:
    p = start_splitwise("prefill")
    registered(redis_server, 1)
    status, body = complete(p, "alone")
    assert status == 503, body
    assert "has no decode instance to pair with" in body["error"]["message"]


def test_incompatible_pair_is_never_formed(
    start_splitwise: StartSplitwise, redis_server: RedisServer,
) -> None:
    p = start_splitwise("prefill", protocols="tcp")
    start_splitwise("decode", "--block-size", "32", protocols="tcp")
    registered(redis_server, 2)
    status, body = complete(p, "layouts")
    assert status == 503, body
    assert "KV layouts differ" in body["error"]["message"]


@pytest.fixture
def slow_prefill(tmp_path: Path) -> Path:
    return write_profile(tmp_path / "slow-prefill.yaml", prefill_seconds_per_token=0.02)


@pytest.fixture
def slow_decode(tmp_path: Path) -> Path:
    return write_profile(tmp_path / "slow-decode.yaml", decode_seconds_per_step=0.1)


def test_prefill_killed_ends_with_a_clear_error(
    start_splitwise: StartSplitwise, redis_server: RedisServer, slow_prefill: Path,
) -> None:
    p = start_splitwise("prefill", profile=slow_prefill)
    d = start_splitwise("decode")
    registered(redis_server, 2)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(complete, d, "p" * 200)  # 4 s of prefill
        wait_until(lambda: held_blocks(d) > 0)
        p.proc.kill()
        status, body = answer.result(timeout=FAILURE_SECS)
    assert status in (500, 502, 503), body
    message = body["error"]["message"]  # after the retries, all on the only prefill instance
    assert "PD Error" in message or p.url.removeprefix("http://") in message, message
    wait_until(lambda: at_baseline(d), timeout=FAILURE_SECS)
    # With P gone from the cluster, the next request is refused at once, saying why.
    wait_until(lambda: complete(d, "after")[0] == 503, timeout=FAILURE_SECS)


def test_decode_killed_mid_stream(
    start_splitwise: StartSplitwise, redis_server: RedisServer, slow_decode: Path,
) -> None:
    p = start_splitwise("prefill")
    d = start_splitwise("decode", profile=slow_decode)
    registered(redis_server, 2)
    stream = open_stream(p, "decode dies", 200)
    first = next(iter(stream))
    assert first.choices
    d.proc.kill()
    with pytest.raises(Exception) as failed:
        for _ in stream:
            pass
    assert "decode instance" in str(failed.value) and "stopped" in str(failed.value)
    wait_until(lambda: at_baseline(p), timeout=FAILURE_SECS)


def test_client_leaving_frees_blocks_on_both(
    start_splitwise: StartSplitwise, redis_server: RedisServer, slow_decode: Path,
) -> None:
    p = start_splitwise("prefill")
    d = start_splitwise("decode", profile=slow_decode)
    registered(redis_server, 2)
    stream = open_stream(p, "leaving " * 20, 400)
    next(iter(stream))
    wait_until(lambda: d.metric("fastdeploy:num_requests_running") == 1)
    stream.close()  # the client leaves: D is told to stop and frees the sequence's blocks
    wait_until(lambda: d.metric("fastdeploy:num_requests_running") == 0, timeout=FAILURE_SECS)
    wait_until(lambda: at_baseline(p) and at_baseline(d) and unloaded(redis_server),
               timeout=FAILURE_SECS)


def test_redis_restart_mid_run(
    start_splitwise: StartSplitwise, redis_server: RedisServer, slow_decode: Path,
) -> None:
    p = start_splitwise("prefill")
    d = start_splitwise("decode", profile=slow_decode)
    registered(redis_server, 2)
    results: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        answer = complete(p if i % 2 else d, f"restart {i}", max_tokens=30)
        with lock:
            results.append(answer)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(send, i) for i in range(6)]
        wait_until(lambda: d.metric("fastdeploy:num_requests_running") > 0)
        redis_server.stop()
        redis_server.start()
        for future in futures:
            future.result(timeout=FAILURE_SECS + EXPIRE_MS / 1000)
    for status, body in results:  # each an answer or a clear error; none hangs
        assert status == 200 or "error" in body, (status, body)
        if status != 200:
            assert status in (500, 502, 503), body
            assert orjson.dumps(body)  # a JSON error body
    registered(redis_server, 2)  # both came back on their own
    status, body = complete(p, "after the restart")
    assert status == 200, body
    wait_until(lambda: at_baseline(p) and at_baseline(d), timeout=FAILURE_SECS)


def test_readers_cut_off_mid_stream_lose_and_repeat_nothing(
    start_splitwise: StartSplitwise, redis_server: RedisServer, slow_decode: Path,
    reference: Callable[[str], str],
) -> None:
    """Redis drops the origin's reading connections again and again during a stream: each
    reader reads again from where it was, and the client's text is exactly the reference."""
    p = start_splitwise("prefill")
    d = start_splitwise("decode", profile=slow_decode)
    registered(redis_server, 2)
    admin = redis_server.client()
    prompt = "cut off " * 10
    expected = reference(prompt)
    stream = open_stream(p, prompt)
    texts = []
    killed = 0
    for chunk in stream:
        texts.extend(c.text for c in chunk.choices)
        for line in admin.execute_command("CLIENT", "LIST").decode().splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if fields.get("cmd") == "xread":
                admin.execute_command("CLIENT", "KILL", "ID", fields["id"])
                killed += 1
    assert killed >= 3  # cut several times mid-stream (not at every chunk: a reader may be
    # reconnecting when the list is read)
    assert "".join(texts) == expected
    wait_until(lambda: at_baseline(p) and at_baseline(d))
    admin.close()


def test_same_request_id_on_two_origins(
    start_splitwise: StartSplitwise, redis_server: RedisServer,
    reference: Callable[[str], str],
) -> None:
    """Ids are unique per origin only; in the cluster each runs under a namespaced one."""
    p = start_splitwise("prefill")
    d = start_splitwise("decode")
    registered(redis_server, 2)
    jobs = [(p, "first prompt of two"), (d, "second prompt, another client")]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda job: complete(job[0], job[1], request_id="same-id"),
                                jobs))
    for (_, prompt), (status, body) in zip(jobs, answers, strict=True):
        assert status == 200, body
        assert body["choices"][0]["text"] == reference(prompt)


def test_prefill_killed_before_the_first_token_is_retried_on_another(
    start_splitwise: StartSplitwise, redis_server: RedisServer, slow_prefill: Path,
    reference: Callable[[str], str],
) -> None:
    prefills = [start_splitwise("prefill", profile=slow_prefill) for _ in range(2)]
    d = start_splitwise("decode")
    registered(redis_server, 3)
    prompt = "r" * 200  # 4 s of prefill
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(complete, d, prompt)
        wait_until(lambda: any(p.metric("fastdeploy:num_requests_running") for p in prefills))
        (victim,) = [p for p in prefills if p.metric("fastdeploy:num_requests_running")]
        victim.proc.kill()
        status, body = answer.result(timeout=FAILURE_SECS)
    assert status == 200, body  # placed again on the other prefill instance
    assert body["choices"][0]["text"] == reference(prompt)
    (survivor,) = [p for p in prefills if p is not victim]
    wait_until(lambda: at_baseline(survivor) and at_baseline(d), timeout=FAILURE_SECS)
