"""The OpenAI API of a real sim engine: shapes, streaming, ids, and every kind of bad input."""

from __future__ import annotations

import contextlib
import socket

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.engine.conftest import Engine


@pytest.fixture
def client(engine: Engine) -> OpenAI:
    """The official client against the shared engine."""
    return OpenAI(base_url=engine.url + "/v1", api_key="unused", max_retries=0)


def test_completion_shape_and_usage(engine: Engine) -> None:
    body = engine.complete("Hello there", max_tokens=7)
    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length"
    assert isinstance(choice["text"], str) and choice["text"]
    usage = body["usage"]
    assert usage["completion_tokens"] == 7
    assert usage["prompt_tokens"] == len(b"Hello there") + 1  # + BOS
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_same_prompt_same_text(engine: Engine) -> None:
    first = engine.complete("determinism check", max_tokens=12, temperature=0)
    second = engine.complete("determinism check", max_tokens=12, temperature=0)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_chat_with_openai_client(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.usage.prompt_tokens_details is not None


def test_streaming_matches_non_streaming(client: OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "stream me"}]
    whole = client.chat.completions.create(
        model="sim", messages=messages, max_tokens=9, temperature=0
    )
    chunks = list(client.chat.completions.create(
        model="sim", messages=messages, max_tokens=9, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens == 9
    assert usage.prompt_tokens_details is not None


def test_completion_stream_without_usage(client: OpenAI) -> None:
    chunks = list(client.completions.create(model="sim", prompt="abc", max_tokens=4,
                                            stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_is_trimmed(engine: Engine) -> None:
    text = engine.complete("stop strings", max_tokens=40, temperature=0)["choices"][0]["text"]
    stop = text[5:7]
    cut = engine.complete("stop strings", max_tokens=40, temperature=0, stop=[stop])
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text[: text.index(stop)]


def test_stop_token_id_ends_generation(engine: Engine) -> None:
    text = engine.complete("stop ids", max_tokens=20, temperature=0)["choices"][0]["text"]
    token = text.encode()[3]
    cut = engine.complete("stop ids", max_tokens=20, temperature=0, stop_token_ids=[token])
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text.encode()[: text.encode().index(token)].decode()


def test_token_id_prompt(engine: Engine) -> None:
    ids = list(b"ids in")
    assert engine.complete(ids, max_tokens=3)["usage"]["prompt_tokens"] == len(ids)


def test_request_id_header_and_body(engine: Engine) -> None:
    status, body = engine.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1},
                                  headers={"X-Request-Id": "from-header-1"})
    assert status == 200 and body["id"] == "cmpl-from-header-1"
    body = engine.complete("x", max_tokens=1, request_id="from-body-1")
    assert body["id"] == "cmpl-from-body-1"


def test_models_and_health(engine: Engine) -> None:
    status, body = engine.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["sim"]
    assert engine.request("GET", "/health")[0] == 200


def test_metrics_lines_are_unlabelled(engine: Engine) -> None:
    engine.complete("metrics", max_tokens=2)
    samples = engine.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "available_gpu_block_num",
                 "gpu_cache_usage_perc", "prompt_tokens_total", "generation_tokens_total",
                 "prefix_cache_hit_rate", "prefix_cache_hits_total",
                 "prefix_cache_queries_total", "time_to_first_token_seconds_count",
                 "time_per_output_token_seconds_count"):
        assert f"fastdeploy:{name}" in samples, name
    assert samples["fastdeploy:generation_tokens_total"] >= 2


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", b"{not json", None),
        ("/v1/completions", b"[1, 2]", None),
        ("/v1/completions", b'{"max_tokens": 3}', "prompt"),
        ("/v1/completions", b'{"prompt": 5}', "prompt"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "5"}', "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "temperature": -1}', "temperature"),
        ("/v1/completions", b'{"prompt": "x", "top_p": 0}', "top_p"),
        ("/v1/completions", b'{"prompt": "x", "n": 2}', "n"),
        ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', "stream"),
        ("/v1/completions", b'{"prompt": "x", "model": "gpt-9"}', "model"),
        ("/v1/completions", b'{"prompt": ""}', "prompt"),
        ("/v1/completions", b'{"prompt": ["a", "b"]}', "prompt"),
        ("/v1/completions", b'{"prompt": [1, 999999]}', "prompt"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000}', "max_tokens"),
        ("/v1/chat/completions", b'{"messages": []}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}',
         "messages.0.role"),
        ("/v1/chat/completions", b'{"messages": "hi"}', "messages"),
        ("/v1/abort_requests", b'{"req_ids": "a"}', "req_ids"),
        ("/v1/abort_requests", b"{}", "req_ids"),
    ],
)
def test_bad_input_is_a_clear_400(engine: Engine, path: str, raw: bytes,
                                  param: str | None) -> None:
    status, body = engine.request("POST", path, raw=raw)
    assert status == 400, body
    error = body["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert engine.complete("still serving", max_tokens=1)["choices"]


def test_prompt_longer_than_the_context(engine: Engine) -> None:
    status, body = engine.request("POST", "/v1/completions",
                                  {"prompt": "x" * 9000, "max_tokens": 1})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "prompt" in body["error"]["message"]


@pytest.mark.parametrize("declared", [True, False])
def test_body_too_large_is_413(engine: Engine, declared: bool) -> None:
    # The engine answers before reading a too-large body, so the body is sent only in part
    # over a raw socket (a normal client would see its upload cut off).
    size = 9 * 1024 * 1024
    framing = f"content-length: {size}" if declared else "transfer-encoding: chunked"
    head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\n{framing}\r\n\r\n".encode()
    chunk = b"x" * (1024 * 1024)
    body = chunk if declared else b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
                                           for _ in range(10))
    with socket.create_connection(("127.0.0.1", engine.port), timeout=30) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):
            sock.sendall(body)
        reply = sock.makefile("rb").read()
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.split()[1] == b"413"
    assert b"body_too_large" in rest
    assert engine.complete("still serving", max_tokens=1)["choices"]


def test_unknown_route_and_method_are_json(engine: Engine) -> None:
    status, body = engine.request("GET", "/v2/nothing")
    assert status == 404 and "error" in body
    status, body = engine.request("GET", "/v1/completions")
    assert status == 405 and "error" in body
