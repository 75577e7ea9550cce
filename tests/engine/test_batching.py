"""Continuous batching, prefix caching, preemption under memory pressure, abort and disconnect.

The sim model's next token depends on every earlier position of its cache, so equal text
across runs means the block tables and the prefix cache handed every sequence the right
blocks.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import orjson

from tests.engine.conftest import Engine, wait_until

BLOCKS = "fastdeploy:available_gpu_block_num"
RUNNING = "fastdeploy:num_requests_running"


def texts(engine: Engine, prompts: list[str], max_tokens: int, parallel: bool) -> list[str]:
    def one(prompt: str) -> str:
        body = engine.complete(prompt, max_tokens=max_tokens, temperature=0)
        return str(body["choices"][0]["text"])

    if not parallel:
        return [one(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_batched_greedy_equals_one_at_a_time(engine: Engine) -> None:
    tag = uuid.uuid4().hex
    prompts = [f"{tag} prompt number {i} " * (i + 1) for i in range(8)]
    alone = texts(engine, prompts, 24, parallel=False)
    together = texts(engine, prompts, 24, parallel=True)
    assert together == alone
    assert len(set(alone)) == len(alone)


def test_prefix_cache_hit_gives_same_tokens_and_reports_cached(engine: Engine) -> None:
    prompt = f"{uuid.uuid4().hex} a long shared system prompt " * 4
    cold = engine.complete(prompt, max_tokens=16, temperature=0)
    warm = engine.complete(prompt, max_tokens=16, temperature=0)
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    prompt_tokens = warm["usage"]["prompt_tokens"]
    cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (prompt_tokens - 1) // 16 * 16 > 0
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
    other = engine.complete(prompt + "but a new ending", max_tokens=4, temperature=0)
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] >= cached
    assert engine.metric("fastdeploy:prefix_cache_hits_total") >= cached


def test_memory_pressure_queues_and_finishes_everything(
    start_engine: Callable[..., Engine],
) -> None:
    # 10 blocks of 16 tokens: one request (41 + 60 tokens = 7 blocks) fits at a time.
    small = start_engine("--block-size", "16", "--num-gpu-blocks", "10",
                         "--enc-dec-block-num", "1")
    prompts = [f"request {i:02d} " * 4 for i in range(8)]
    alone = texts(small, prompts, 60, parallel=False)
    together = texts(small, prompts, 60, parallel=True)
    assert together == alone
    assert small.metric(BLOCKS) == 10
    assert small.metric("fastdeploy:num_requests_waiting") == 0


def start_stream(engine: Engine, rid: str) -> socket.socket:
    """Start a long streaming request over a raw socket and read until its first token."""
    body = orjson.dumps({"prompt": "a long story", "max_tokens": 3000, "stream": True,
                         "ignore_eos": True})
    sock = socket.create_connection(("127.0.0.1", engine.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-request-id: " + rid.encode()
                 + b"\r\ncontent-type: application/json\r\ncontent-length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b'"text"' not in received:
        data = sock.recv(65536)
        assert data and b"error" not in received, received
        received += data
    assert received.startswith(b"HTTP/1.1 200"), received
    return sock


def test_abort_frees_every_block(engine: Engine) -> None:
    total = engine.metric(BLOCKS)
    rids = [f"abort-{uuid.uuid4().hex}" for _ in range(3)]
    socks = [start_stream(engine, rid) for rid in rids]
    assert engine.metric(BLOCKS) < total
    status, body = engine.request("POST", "/v1/abort_requests",
                                  {"req_ids": [rids[0], "no-such-request"]})
    assert status == 200
    assert [a["request_id"] for a in body["result"]["aborted"]] == [rids[0]]
    assert body["result"]["aborted"][0]["completion_tokens"] >= 1
    assert body["result"]["not_found"] == ["no-such-request"]
    tail = b""
    while b"[DONE]" not in tail:
        tail += socks[0].recv(65536)
    assert b'"finish_reason":"abort"' in tail
    status, body = engine.request("POST", "/v1/abort_requests", {"abort_all": True})
    assert sorted(a["request_id"] for a in body["result"]["aborted"]) == sorted(rids[1:])
    assert engine.metric(BLOCKS) == total and engine.metric(RUNNING) == 0
    for sock in socks:
        sock.close()


def test_stream_disconnect_frees_blocks(engine: Engine) -> None:
    total = engine.metric(BLOCKS)
    sock = start_stream(engine, f"gone-{uuid.uuid4().hex}")
    sock.close()
    wait_until(lambda: engine.metric(RUNNING) == 0 and engine.metric(BLOCKS) == total)


def test_non_stream_disconnect_frees_blocks(engine: Engine) -> None:
    total = engine.metric(BLOCKS)
    body = orjson.dumps({"prompt": "never read", "max_tokens": 3000, "ignore_eos": True})
    sock = socket.create_connection(("127.0.0.1", engine.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_until(lambda: engine.metric(RUNNING) == 1)
    sock.close()
    wait_until(lambda: engine.metric(RUNNING) == 0 and engine.metric(BLOCKS) == total)
