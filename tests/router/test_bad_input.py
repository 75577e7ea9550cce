"""Bad input gets a clear 4xx/503 with a JSON body, and the router keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.router.conftest import Router, RouterFactory

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def served(backends, router: RouterFactory) -> Router:
    (backend,) = backends(1)
    r = router([backend], server={"max-body-bytes": 4096})
    await r.wait_healthy(1)
    return r


async def _still_serves(r: Router) -> None:
    status, body, _ = await r.post("/v1/chat/completions", CHAT)
    assert status == 200 and body["choices"][0]["message"]["content"] == "hello from b0"


@pytest.mark.parametrize(
    ("path", "raw", "status", "message"),
    [
        ("/v1/chat/completions", b'{"messages": [', 400, "not valid JSON"),
        ("/v1/chat/completions", b"", 400, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object, got list"),
        ("/v1/chat/completions", b'{"messages": "hi"}', 400, "messages: required"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "messages: required"),
        ("/v1/chat/completions", b'{"messages": [3]}', 400, "messages[0]: must be an object"),
        ("/v1/chat/completions", b'{"messages": [{"content": 5}]}', 400,
         "messages[0].content: must be"),
        ("/v1/chat/completions", b'{"messages": [{"content": "x"}], "stream": "yes"}', 400,
         "stream: must be a boolean"),
        ("/v1/chat/completions", b'{"messages": [{"content": "x"}], "model": 5}', 400,
         "model: must be a string"),
        ("/v1/completions", b'{"prompt": 5}', 400, "prompt: required"),
        ("/v1/completions", b'{}', 400, "prompt: required"),
        ("/v1/completions", b'{"prompt": "x", "request_id": 9}', 400,
         "request_id: must be a string"),
        ("/v1/completions", b'{"prompt": "' + b"x" * 5000 + b'"}', 413, "the limit is 4096"),
        ("/v1/abort_requests", b"{", 400, "not valid JSON"),
        ("/v1/abort_requests", b'{"req_ids": "a"}', 400, "give req_ids"),
        ("/v1/abort_requests", b'{"abort_all": "yes"}', 400, "abort_all: must be a boolean"),
        ("/register", b"{oops", 400, "not valid JSON"),
    ],
)
async def test_bad_bodies(served: Router, path: str, raw: bytes, status: int,
                          message: str) -> None:
    got, body, headers = await served.post(path, data=raw,
                                           headers={"content-type": "application/json"})
    assert got == status
    assert headers["content-type"] == "application/json"
    assert message in body["error"]["message"]
    await _still_serves(served)


async def test_declared_oversize_body_is_refused_before_reading(served: Router) -> None:
    status, body, _ = await served.post(
        "/v1/completions", data=b"x" * 100_000, headers={"content-type": "application/json"}
    )
    assert status == 413
    assert body["error"]["type"] == "request_too_large"
    await _still_serves(served)


async def test_chunked_oversize_body_is_cut_off(served: Router) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    async with aiohttp.ClientSession() as session, session.post(
        f"{served.url}/v1/completions", data=chunks(),
        headers={"content-type": "application/json"},
    ) as resp:
        assert resp.status == 413
        assert "exceeds the limit of 4096" in (await resp.json())["error"]["message"]
    await _still_serves(served)


async def test_unknown_path_and_wrong_method(served: Router) -> None:
    status, body = await served.get("/v1/nothing-here")
    assert status == 404 and body["error"]["message"] == "no route for GET /v1/nothing-here"
    status, body = await served.get("/v1/chat/completions")
    assert status == 405 and "not allowed" in body["error"]["message"]
    await _still_serves(served)


async def test_no_healthy_instance_is_503(router: RouterFactory) -> None:
    r = router()
    status, body, _ = await r.post("/v1/chat/completions", CHAT)
    assert status == 503
    assert body["error"]["message"] == "no healthy mixed instance available"
