"""fdcore.http, the edge both servers share: one OpenAI error body, one bounded body reader,
one disconnect watcher."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive

from fdcore.http import (
    APIError,
    ClientGone,
    error_body,
    error_event,
    parse_json,
    read_body,
    until_disconnect,
)
from fdcore.testing.cluster import EngineFactory, RouterFactory

LIMIT = 4096


def _receive(*messages: Message, then: Message | None = None) -> Receive:
    """``receive`` that gives ``messages`` in order, then ``then`` (or waits forever)."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        if then is None:
            await asyncio.Event().wait()
        assert then is not None
        return then

    return receive


def _chunk(body: bytes, more: bool = False) -> Message:
    return {"type": "http.request", "body": body, "more_body": more}


_DISCONNECT: Message = {"type": "http.disconnect"}


def _scope(content_length: int | None = None) -> dict[str, Any]:
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    return {"type": "http", "headers": headers}


# --- the error body ---------------------------------------------------------------------------

def test_error_body_is_openai_shaped_with_a_string_code() -> None:
    assert orjson.loads(error_body(404, "no such thing")) == {"error": {
        "message": "no such thing", "type": "invalid_request_error", "param": None,
        "code": "404",
    }}
    named = orjson.loads(error_body(400, "too long", param="prompt",
                                    code="context_length_exceeded"))
    assert named["error"]["code"] == "context_length_exceeded"
    assert named["error"]["param"] == "prompt"


def test_an_api_error_renders_as_the_error_body() -> None:
    error = APIError(429, "queue full", "rate_limit_error", code="queue_full")
    assert error.body() == error_body(429, "queue full", "rate_limit_error", code="queue_full")
    response = error.response({"retry-after": "1"})
    assert response.status_code == 429
    assert response.body == error.body()
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "1"
    assert error_event(504, "slow", "timeout") == b"data: " + error_body(504, "slow", "timeout") + b"\n\n"


def test_malformed_json_is_a_400_naming_invalid_json() -> None:
    with pytest.raises(APIError) as exc:
        parse_json(b'{"messages": [')
    assert (exc.value.status, exc.value.code) == (400, "invalid_json")
    assert exc.value.message.startswith("request body is not valid JSON: ")
    assert parse_json(b'{"a": 1}') == {"a": 1}


# --- the body reader --------------------------------------------------------------------------

async def test_body_reader_joins_chunks_up_to_the_limit() -> None:
    half = b"x" * (LIMIT // 2)
    receive = _receive(_chunk(half, more=True), _chunk(half))
    assert await read_body(_scope(), receive, LIMIT) == half + half


async def test_a_declared_oversize_body_is_refused_before_reading() -> None:
    async def receive() -> Message:
        raise AssertionError("the body was read")

    with pytest.raises(APIError) as exc:
        await read_body(_scope(LIMIT + 1), receive, LIMIT)
    error = exc.value
    assert (error.status, error.type, error.code) == (413, "request_too_large", "body_too_large")
    assert error.message == f"request body is {LIMIT + 1} bytes; the limit is {LIMIT}"


async def test_an_undeclared_oversize_body_is_cut_off_at_the_limit() -> None:
    received = []

    async def receive() -> Message:
        received.append(1)
        return _chunk(b"x" * 1000, more=True)

    with pytest.raises(APIError) as exc:
        await read_body(_scope(), receive, LIMIT)
    assert exc.value.status == 413
    assert exc.value.message == f"request body exceeds the limit of {LIMIT} bytes"
    assert len(received) == 5  # the chunk that crossed the limit is the last one read


async def test_a_client_that_leaves_mid_body_is_gone() -> None:
    with pytest.raises(ClientGone):
        await read_body(_scope(), _receive(_chunk(b"x", more=True), _DISCONNECT), LIMIT)
    # Starlette's own disconnect, so a Starlette app's handler for that answers it too.
    assert issubclass(ClientGone, ClientDisconnect)


# --- the disconnect watcher -------------------------------------------------------------------

async def test_work_that_finishes_returns_its_result() -> None:
    gone: list[bool] = []

    async def work() -> str:
        await asyncio.sleep(0)
        return "done"

    assert await until_disconnect(_receive(), work(), lambda: gone.append(True)) == "done"
    assert gone == []


async def test_a_disconnect_cancels_the_work_after_on_disconnect() -> None:
    seen: list[str] = []
    leave = asyncio.Event()

    async def receive() -> Message:
        await leave.wait()
        return _DISCONNECT

    async def work() -> None:
        try:
            leave.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")  # on_disconnect has run by now: work can tell why
            raise

    with pytest.raises(ClientGone):
        await until_disconnect(receive, work(), lambda: seen.append("on_disconnect"))
    assert seen == ["on_disconnect", "cancelled"]
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the task goes on, uncancelled
    await asyncio.sleep(0)


async def test_another_cancel_passes_through_without_on_disconnect() -> None:
    gone: list[bool] = []

    async def request() -> None:
        await until_disconnect(_receive(), asyncio.Event().wait(), lambda: gone.append(True))

    task = asyncio.ensure_future(request())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gone == []


async def test_a_disconnect_after_the_work_is_ignored() -> None:
    gone: list[bool] = []

    async def work() -> int:
        await asyncio.sleep(0)  # the watch runs: it sees the disconnect, its callback is due
        return 7

    # The work ends before that callback runs: it must not cancel the task afterwards (as
    # uvicorn's receive does report a disconnect once the response is complete).
    assert await until_disconnect(_receive(_DISCONNECT), work(), lambda: gone.append(True)) == 7
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert gone == []


async def test_messages_other_than_disconnect_are_not_a_disconnect() -> None:
    gone: list[bool] = []
    finish = asyncio.Event()

    async def work() -> str:
        await finish.wait()
        return "done"

    receive = _receive(_chunk(b""), _chunk(b""))
    runner = asyncio.ensure_future(until_disconnect(receive, work(), lambda: gone.append(True)))
    for _ in range(5):
        await asyncio.sleep(0)
    finish.set()
    assert await runner == "done"
    assert gone == []


# --- both servers -----------------------------------------------------------------------------

async def _post(url: str, raw: bytes) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as session, session.post(
        url + "/v1/completions", data=raw, headers={"content-type": "application/json"},
    ) as resp:
        return resp.status, await resp.read(), resp.content_type


async def test_router_and_engine_answer_the_same_error_body(
    router: RouterFactory, engines: EngineFactory
) -> None:
    served = router([], server={"max-body-bytes": LIMIT})
    [engine] = engines(1, flags=["--max-request-bytes", str(LIMIT)])
    cases: dict[str, tuple[bytes, int, str]] = {
        "malformed JSON": (b'{"prompt": ', 400, "invalid_json"),
        "declared oversize body": (b'{"prompt": "' + b"x" * (2 * LIMIT) + b'"}', 413,
                                   "body_too_large"),
    }
    for case, (raw, status, code) in cases.items():
        from_router = await _post(served.url, raw)
        from_engine = await _post(engine.url, raw)
        assert from_router == from_engine, case
        got, body, content_type = from_router
        assert (got, content_type) == (status, "application/json"), case
        error = orjson.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == code, case
