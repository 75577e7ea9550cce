"""A small OpenAI-compatible test instance for router tests (``python -m fdcore.testing.backend``).

It answers chat and completion requests, streamed or not, and lets a test steer it through
request headers:

* ``x-test-status: 422`` — answer with that status and an OpenAI error body;
* ``x-test-chunks: N`` — stream N content chunks (default 3);
* ``x-test-chunk-wait: 1`` — before each chunk after the first, wait until ``POST /test/release``;
* ``x-test-hang: 1`` — never send response headers (until released);
* ``x-test-close: 1`` — drop the connection without answering.

``GET /test/state`` reports what it saw: requests by id with their headers, and which ended
because the client went away. ``POST /test/health`` with ``{"ok": false}`` makes ``/health``
fail. ``POST /test/fail`` with ``{"status": 500}`` answers every inference request without an
``x-test-status`` header with that status (``{"status": 0}`` ends it) while ``/health`` stays
200.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from fdcore.http import error_body


class BackendState:
    """What the test backend has seen and how it is told to behave."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.fail_status = 0
        self.requests: dict[str, dict[str, Any]] = {}
        self.cancelled: list[str] = []
        self.completed: list[str] = []
        self.aborts: list[Any] = []
        self.inflight: set[str] = set()
        self.release = asyncio.Event()


def _state(request: web.Request) -> BackendState:
    state: BackendState = request.app["state"]
    return state


def _chunk(rid: str, endpoint: str, text: str, finish: str | None) -> bytes:
    if endpoint == "chat":
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": "test-model",
            "choices": [choice]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _error(status: int, message: str) -> web.Response:
    return web.Response(body=error_body(status, message), status=status,
                        content_type="application/json")


async def _generate(request: web.Request, endpoint: str) -> web.StreamResponse:
    state = _state(request)
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "bad json")
    rid = request.headers.get("x-request-id", "none")
    echo = {"x-request-id": rid, "x-backend": state.name}
    headers = {k.lower(): v for k, v in request.headers.items()}
    state.requests[rid] = {"headers": headers, "body": payload, "endpoint": endpoint}
    if request.headers.get("x-test-close"):
        assert request.transport is not None
        request.transport.close()
        raise web.HTTPBadRequest  # never reaches the client: the socket is gone
    status = int(request.headers.get("x-test-status", "0")) or state.fail_status or 200
    if status != 200:
        return _error(status, f"test backend {state.name} says {status}")
    state.inflight.add(rid)
    try:
        if request.headers.get("x-test-hang"):
            await state.release.wait()
        text = f"hello from {state.name}"
        if not payload.get("stream"):
            await asyncio.sleep(0)
            if endpoint == "chat":
                choice: dict[str, Any] = {
                    "index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "finish_reason": "stop"}
                obj = "text_completion"
            state.completed.append(rid)
            return web.json_response({
                "id": rid, "object": obj, "created": int(time.time()), "model": "test-model",
                "choices": [choice],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                          "prompt_tokens_details": {"cached_tokens": 0}},
            }, headers=echo)
        response = web.StreamResponse(headers={"content-type": "text/event-stream", **echo})
        await response.prepare(request)
        chunks = int(request.headers.get("x-test-chunks", "3"))
        wait = bool(request.headers.get("x-test-chunk-wait"))
        for index in range(chunks):
            if wait and index:
                await state.release.wait()
            last = index == chunks - 1
            await response.write(_chunk(rid, endpoint, f"{state.name}-{index} ",
                                        "stop" if last else None))
        await response.write(b"data: [DONE]\n\n")
        state.completed.append(rid)
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        state.cancelled.append(rid)
        raise
    finally:
        state.inflight.discard(rid)


async def chat(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    return await _generate(request, "completions")


async def health(request: web.Request) -> web.Response:
    """``GET /health``: 200 unless told otherwise."""
    ok = _state(request).healthy
    return web.json_response({"ok": ok}, status=200 if ok else 503)


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models``."""
    name = _state(request).name
    return web.json_response({"object": "list", "data": [
        {"id": "test-model", "object": "model", "owned_by": "fdcore"},
        {"id": f"model-{name}", "object": "model", "owned_by": "fdcore"},
    ]})


async def abort(request: web.Request) -> web.Response:
    """``POST /v1/abort_requests``: reports in-flight ids as aborted."""
    state = _state(request)
    payload = await request.json()
    state.aborts.append(payload)
    if payload.get("abort_all"):
        ids = sorted(state.inflight)
        return web.json_response({"aborted": [{"request_id": i} for i in ids], "not_found": []})
    wanted = payload.get("req_ids", [])
    hit = [i for i in wanted if i in state.inflight]
    return web.json_response({"aborted": [{"request_id": i} for i in hit],
                              "not_found": [i for i in wanted if i not in state.inflight]})


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` with the gauges routers scrape."""
    state = _state(request)
    text = (f"fastdeploy:num_requests_running {len(state.inflight)}\n"
            "fastdeploy:num_requests_waiting 0\n"
            "fastdeploy:available_gpu_block_num 100\n")
    return web.Response(text=text, content_type="text/plain")


async def test_state(request: web.Request) -> web.Response:
    """``GET /test/state``."""
    state = _state(request)
    return web.json_response({"name": state.name, "requests": state.requests,
                              "cancelled": state.cancelled, "completed": state.completed,
                              "inflight": sorted(state.inflight), "aborts": state.aborts})


async def test_health(request: web.Request) -> web.Response:
    """``POST /test/health`` ``{"ok": bool}``."""
    _state(request).healthy = bool((await request.json())["ok"])
    return web.json_response({"ok": True})


async def test_release(request: web.Request) -> web.Response:
    """``POST /test/release``: let waiting requests go on."""
    _state(request).release.set()
    return web.json_response({"ok": True})


async def test_fail(request: web.Request) -> web.Response:
    """``POST /test/fail`` ``{"status": int}``: answer inference requests so (0: normally)."""
    _state(request).fail_status = int((await request.json())["status"])
    return web.json_response({"ok": True})


def make_app(name: str) -> web.Application:
    """The test backend's aiohttp app."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["state"] = BackendState(name)
    app.add_routes([
        web.post("/v1/chat/completions", chat), web.post("/v1/completions", completions),
        web.get("/health", health), web.get("/v1/models", models),
        web.post("/v1/abort_requests", abort), web.get("/metrics", metrics),
        web.get("/test/state", test_state), web.post("/test/health", test_health),
        web.post("/test/release", test_release), web.post("/test/fail", test_fail),
    ])
    return app


def main() -> None:
    """Run the test backend."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="backend")
    args = parser.parse_args()
    # handler_cancellation: a client that goes away cancels its handler, which the state records.
    web.run_app(make_app(args.name), host=args.host, port=args.port, print=None,
                access_log=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
