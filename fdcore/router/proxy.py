"""The streaming proxy: one inference request in, one instance's answer out, chunk by chunk.

The two inference endpoints are raw ASGI apps (no Starlette request/response objects) because
they are the router's hot path; everything else goes through Starlette.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import orjson
import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from fdcore.config import ProxyConfig
from fdcore.router.errors import ClientError, error_body
from fdcore.router.metrics import RouterMetrics
from fdcore.router.prompts import PROMPT_READERS, check_common
from fdcore.router.selection import Lease, NoInstance, Selector
from fdcore.router.upstream import ConnectFailed, ResponseFailed, UpstreamPool, UpstreamResponse
from fdcore.types import Outcome, Role, RouteRequest

log = structlog.get_logger("fdcore.proxy")

# Headers that describe one hop's connection or body framing, never forwarded.
_HOP_HEADERS = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailers", b"transfer-encoding", b"upgrade", b"content-length", b"host",
    b"accept-encoding", b"x-request-id",
})
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_JSON = b"application/json"


class ClientGone(Exception):
    """The client disconnected before the answer was complete."""


class _Exchange:
    """Per-request state: who the client is, what it sent, how it ended."""

    __slots__ = ("endpoint", "gone", "request_id", "started", "status")

    def __init__(self, endpoint: str, request_id: str) -> None:
        self.endpoint = endpoint
        self.request_id = request_id
        self.started = time.perf_counter()
        self.status = 0
        self.gone = False


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise ClientError(413, f"request body is {int(value)} bytes; the limit is {limit}",
                              type_="request_too_large")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"request body exceeds the limit of {limit} bytes",
                              type_="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Proxy:
    """Forwards OpenAI requests to instances chosen by the :class:`Selector`.

    Retries on another instance only when no response byte has arrived; relays the instance's
    status and body unchanged; releases the lease however the request ends; a client that goes
    away closes the upstream connection, which is how the instance learns to stop.
    """

    def __init__(
        self, selector: Selector, metrics: RouterMetrics, config: ProxyConfig, max_body: int,
        splitwise: bool = False,
    ) -> None:
        self.selector = selector
        self.metrics = metrics
        self.config = config
        self.max_body = max_body
        self.splitwise = splitwise
        self.pool = UpstreamPool(config.connect_timeout_secs)

    async def stop(self) -> None:
        """Close pooled upstream connections."""
        self.pool.close()

    def endpoint(self, endpoint: str) -> ASGIApp:
        """A raw ASGI app forwarding to ``endpoint`` (``chat`` or ``completions``)."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            request_id = ""
            for name, value in scope["headers"]:
                if name == b"x-request-id":
                    request_id = value.decode("latin-1")
            ex = _Exchange(endpoint, request_id)
            try:
                await self._handle(ex, scope, receive, send)
            except ClientError as exc:
                await self._reply_error(ex, send, exc.status, exc.message, exc.type, exc.param)
            except ClientGone:
                ex.status = 499
            except Exception as exc:  # a bug must cost one request, not the router
                log.exception("proxy failed", request_id=ex.request_id)
                if ex.status:
                    raise
                await self._reply_error(ex, send, 500, f"internal error: {exc!r}",
                                        "internal_error")
            self._observe(ex)

        return app

    def _observe(self, ex: _Exchange) -> None:
        elapsed = time.perf_counter() - ex.started
        self.metrics.count_request(ENDPOINT_PATHS[ex.endpoint], ex.status)
        self.metrics.child(self.metrics.latency, ex.endpoint).observe(elapsed)
        log.debug("request done", request_id=ex.request_id, endpoint=ex.endpoint,
                  status=ex.status, seconds=round(elapsed, 6))

    async def _handle(self, ex: _Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        if self.splitwise:
            # Instances register with their roles already; pairing them comes with PD routing.
            raise ClientError(501, "prefill/decode (splitwise) routing is not available in this "
                              "version; run the router without --splitwise",
                              type_="not_implemented")
        body = await _read_body(scope, receive, self.max_body)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ClientError(400, f"request body is not valid JSON: {exc}") from None
        check_common(payload)
        prompt = PROMPT_READERS[ex.endpoint](payload)
        if not ex.request_id:
            # Unique, not secret: the cheapest 128 random bits.
            ex.request_id = payload.get("request_id") or f"{random.getrandbits(128):032x}"
        route = RouteRequest(ex.request_id, ex.endpoint, prompt, payload, len(prompt), Role.MIXED)
        head = self._head(ex, scope)
        stream = payload.get("stream") is True
        # After the body, the only message ``receive`` can bring is http.disconnect: watch it
        # and cancel this task when it comes.
        task = asyncio.current_task()
        assert task is not None

        def on_disconnect(fut: asyncio.Future[Any]) -> None:
            if not fut.cancelled():
                ex.gone = True
                task.cancel()

        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(on_disconnect)
        try:
            await self._route(ex, route, head, body, stream, send)
        except asyncio.CancelledError:
            if not ex.gone:
                raise
            task.uncancel()
            raise ClientGone from None
        finally:
            watcher.remove_done_callback(on_disconnect)
            watcher.cancel()

    def _head(self, ex: _Exchange, scope: Scope) -> bytes:
        parts = [b"POST ", ENDPOINT_PATHS[ex.endpoint].encode(), b" HTTP/1.1\r\n"]
        for name, value in scope["headers"]:
            if name not in _HOP_HEADERS:
                parts += (name, b": ", value, b"\r\n")
        parts += (b"x-request-id: ", ex.request_id.encode("latin-1"), b"\r\n")
        return b"".join(parts)

    async def _route(
        self, ex: _Exchange, route: RouteRequest, head: bytes, body: bytes, stream: bool,
        send: Send,
    ) -> None:
        exclude: set[str] = set()
        while True:
            try:
                lease = await self.selector.acquire(route, frozenset(exclude))
            except NoInstance as exc:
                await self._reply_error(ex, send, 503, str(exc), "service_unavailable")
                return
            outcome = Outcome.ERROR
            try:
                outcome = await self._exchange(ex, lease, head, body, stream, send)
                return
            except asyncio.CancelledError:
                outcome = Outcome.DISCONNECT if ex.gone else Outcome.ERROR
                raise
            except ConnectFailed as exc:
                exclude.add(lease.instance.url)
                self.metrics.retries.labels(lease.instance.url).inc()
                log.warning("connect failed", request_id=ex.request_id,
                            instance=lease.instance.url, error=str(exc), attempt=len(exclude))
                if len(exclude) > self.config.max_retries:
                    await self._reply_error(
                        ex, send, 502,
                        f"could not reach an instance after {len(exclude)} attempts: {exc}",
                        "bad_gateway",
                    )
                    return
            except TimeoutError:
                outcome = Outcome.TIMEOUT
                if ex.status:  # a stream had started: end it with an error event
                    await _end_stream(send, 504, f"instance {lease.instance.url} timed out "
                                      f"after {self.config.total_timeout_secs}s", "timeout")
                    return
                await self._reply_error(
                    ex, send, 504, f"instance {lease.instance.url} did not answer within "
                    f"{self.config.first_byte_timeout_secs}s", "timeout",
                )
                return
            except ResponseFailed as exc:
                if ex.status:
                    return
                await self._reply_error(ex, send, 502,
                                        f"instance {lease.instance.url} failed: {exc}",
                                        "bad_gateway")
                return
            finally:
                lease.release(outcome)

    async def _exchange(
        self, ex: _Exchange, lease: Lease, head: bytes, body: bytes, stream: bool, send: Send
    ) -> Outcome:
        instance = lease.instance
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.total_timeout_secs
        # One timer: the first-byte deadline, then moved to the total deadline.
        async with asyncio.timeout(
            min(self.config.first_byte_timeout_secs, self.config.total_timeout_secs)
        ) as timer:
            upstream = await self.pool.request(instance.host_ip, instance.port, head, body)
            timer.reschedule(deadline)
            self.metrics.child(self.metrics.ttfb, ex.endpoint).observe(
                time.perf_counter() - ex.started
            )
            self.metrics.child(
                self.metrics.inference_requests, instance.url, "", "", str(upstream.status)
            ).inc()
            headers = [
                (b"content-type", upstream.content_type),
                (b"x-request-id", ex.request_id.encode("latin-1")),
                (b"x-router-instance-url", instance.url.encode()),
            ]
            if stream and upstream.status == 200:
                return await self._relay(ex, upstream, headers, send, instance.url)
            try:
                data = await upstream.read()
            except BaseException:
                upstream.close()
                raise
            upstream.release()
            ex.status = upstream.status
            headers.append((b"content-length", str(len(data)).encode()))
            await send({"type": "http.response.start", "status": upstream.status,
                        "headers": headers})
            await send({"type": "http.response.body", "body": data})
            return Outcome.SUCCESS if upstream.status < 500 else Outcome.ERROR

    async def _relay(
        self, ex: _Exchange, upstream: UpstreamResponse, headers: list[tuple[bytes, bytes]],
        send: Send, url: str,
    ) -> Outcome:
        ex.status = upstream.status
        headers.append((b"cache-control", b"no-cache"))
        await send({"type": "http.response.start", "status": upstream.status,
                    "headers": headers})
        done = False
        try:
            async for chunk in upstream.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            done = True
        except ResponseFailed as exc:
            await _end_stream(send, 502, f"instance {url} failed mid-stream: {exc}",
                              "bad_gateway")
            return Outcome.ERROR
        finally:
            if not done:
                upstream.close()  # closing is what tells the instance to stop generating
        upstream.release()
        await send({"type": "http.response.body", "body": b""})
        return Outcome.SUCCESS

    async def _reply_error(
        self, ex: _Exchange, send: Send, status: int, message: str, type_: str,
        param: str | None = None,
    ) -> None:
        ex.status = status
        headers = [(b"content-type", _JSON)]
        if ex.request_id:
            headers.append((b"x-request-id", ex.request_id.encode("latin-1")))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": error_body(status, message, type_,
                                                                     param)})


async def _end_stream(send: Send, status: int, message: str, type_: str) -> None:
    """Finish a started SSE stream with an error event."""
    event = b"data: " + error_body(status, message, type_) + b"\n\n"
    await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def models_union(answers: list[Any]) -> dict[str, Any]:
    """Merge instances' ``/v1/models`` answers into one OpenAI list, by model id."""
    seen: dict[str, dict[str, Any]] = {}
    for answer in answers:
        if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
            continue
        for model in answer["data"]:
            if isinstance(model, dict) and isinstance(model.get("id"), str):
                seen.setdefault(model["id"], model)
    return {"object": "list", "data": list(seen.values())}
