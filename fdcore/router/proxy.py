"""The streaming proxy: one inference request in, one instance's answer out, chunk by chunk.

The two inference endpoints are raw ASGI apps (no Starlette request/response objects) because
they are the router's hot path; everything else goes through Starlette.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from fdcore.config import ProxyConfig
from fdcore.http import (
    APIError,
    BadRequestId,
    ClientGone,
    bad_header_value,
    check_request_id,
    error_body,
    error_event,
    parse_json,
    read_body,
    until_disconnect,
)
from fdcore.router.metrics import RouterMetrics
from fdcore.router.prompts import PROMPT_READERS, check_common
from fdcore.router.selection import Lease, NoInstance, Selector
from fdcore.router.upstream import ConnectFailed, ResponseFailed, UpstreamPool, UpstreamResponse
from fdcore.types import Outcome, Role, RouteRequest

if TYPE_CHECKING:
    from fdcore.drain import Drain

log = structlog.get_logger("fdcore.proxy")

# Headers that describe one hop's connection or body framing, never forwarded.
_HOP_HEADERS = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailers", b"transfer-encoding", b"upgrade", b"content-length", b"host",
    b"accept-encoding", b"x-request-id", b"expect", b"x-fdcore-via", b"x-admin-key",
})
# Router ids a request has passed through; a router that finds its own id refuses the loop.
VIA_HEADER = b"x-fdcore-via"
_MAX_HOPS = 8
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_PATHS = {name: path.encode() for name, path in ENDPOINT_PATHS.items()}
_JSON = b"application/json"


class Drained(Exception):
    """The router's drain grace period ended before this request finished."""


class Exchange:
    """Per-request state: who the client is, what it sent, how it ended.

    The edge (:class:`Proxy`) fills in the request (``route``, ``payload``, ``body``,
    ``stream``, the forwarded header ``lines``) before the dispatch runs; the dispatch and the
    relay fill in how it went.
    """

    __slots__ = ("answer", "body", "drained", "endpoint", "first_byte_at", "gone", "lines",
                 "payload", "request_id", "route", "started", "status", "stream",
                 "upstream_status")

    route: RouteRequest
    payload: dict[str, Any]

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.request_id = ""  # set once validated: it is echoed in response headers
        self.lines: list[bytes] = []
        self.body = b""
        self.stream = False
        self.started = time.perf_counter()
        self.status = 0
        self.gone = False
        self.drained = False
        # What the policy's release result reports of the current attempt.
        self.first_byte_at: float | None = None
        self.upstream_status = 0
        self.answer = b""  # the body, or a stream's last chunks (for ``usage``)


class Dispatch(Protocol):
    """How a request reaches instances, chosen when the app is built: mixed (one instance,
    :meth:`Proxy.route_mixed`) or paired (a prefill and a decode instance,
    :class:`fdcore.router.paired.PairedDispatch`). It answers the client through ``send``
    (with :meth:`Proxy.exchange` for the answer it relays) and releases every lease it takes.
    """

    async def __call__(self, ex: Exchange, send: Send) -> None:
        """Serve ``ex`` (its request already read and checked)."""
        ...


class Screen(Protocol):
    """Looks at an answer before the client does; raises to refuse it (a paired dispatch
    retries a failed hand-off this way). Both methods are called only before the client has
    seen a byte."""

    def answer(self, status: int, body: bytes) -> None:
        """A whole (non-streamed) answer."""
        ...

    def ready(self, head: bytes) -> bool:
        """A stream's first bytes so far: whether the client may have them now (False: wait
        for more)."""
        ...


class Proxy:
    """Forwards OpenAI requests to instances chosen by the :class:`Selector`.

    Retries on another instance only when no response byte has arrived; relays the instance's
    status and body unchanged; releases the lease however the request ends; a client that goes
    away closes the upstream connection, which is how the instance learns to stop.

    Every value written into the upstream head is checked first (:mod:`fdcore.http`): a
    request id or header that could end the head early is a 400, never forwarded.
    """

    def __init__(
        self, selector: Selector, metrics: RouterMetrics, config: ProxyConfig, max_body: int,
        drain: Drain | None = None, router_keys: bool = False,
    ) -> None:
        self.selector = selector
        self.metrics = metrics
        self.config = config
        self.max_body = max_body
        self.drain = drain
        # The router's own keys never travel on to an instance (a rogue one would collect
        # them); without router keys, Authorization is the instances' business and passes.
        self._skip = _HOP_HEADERS | ({b"authorization"} if router_keys else set())
        self.pool = UpstreamPool(config.connect_timeout_secs)
        self.router_id = f"{random.getrandbits(64):016x}".encode()
        self._active: dict[Exchange, asyncio.Task[Any]] = {}
        self._drain_watch: asyncio.Task[None] | None = None
        self.dispatch: Dispatch = self.route_mixed

    async def start(self) -> None:
        """Watch the drain: when its grace period ends, end every request still in flight."""
        if self.drain is not None:
            self._drain_watch = asyncio.create_task(self._end_on_drain(self.drain),
                                                    name="fdcore-proxy-drain")

    async def stop(self) -> None:
        """Close pooled upstream connections."""
        if self._drain_watch is not None:
            self._drain_watch.cancel()
        self.pool.close()

    async def _end_on_drain(self, drain: Drain) -> None:
        await drain.expired.wait()
        for ex, task in list(self._active.items()):
            ex.drained = True
            task.cancel()

    def endpoint(self, endpoint: str) -> ASGIApp:
        """A raw ASGI app forwarding to ``endpoint`` (``chat`` or ``completions``)."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            ex = Exchange(endpoint)
            try:
                await self._handle(ex, scope, receive, send)
            except APIError as exc:
                await self.reply_error(ex, send, exc.status, exc.message, exc.type, exc.param,
                                        code=exc.code)
            except ClientGone:
                ex.status = 499
            except Drained:
                message = "the router is shutting down; retry on another router"
                if ex.status:
                    await _end_stream(send, 503, message, "service_unavailable")
                else:
                    await self.reply_error(ex, send, 503, message, "service_unavailable")
            except Exception as exc:  # a bug must cost one request, not the router
                log.exception("proxy failed", request_id=ex.request_id)
                if ex.status:
                    raise
                await self.reply_error(ex, send, 500, f"internal error: {exc!r}",
                                        "internal_error")
            self._observe(ex)

        return app

    def _observe(self, ex: Exchange) -> None:
        elapsed = time.perf_counter() - ex.started
        self.metrics.count_request(ENDPOINT_PATHS[ex.endpoint], ex.status)
        self.metrics.child(self.metrics.latency, ex.endpoint).observe(elapsed)
        log.debug("request done", request_id=ex.request_id, endpoint=ex.endpoint,
                  status=ex.status, seconds=round(elapsed, 6))

    def _read_head(self, scope: Scope) -> tuple[str, list[bytes]]:
        """Check the client's headers in one pass; return its ``X-Request-Id`` ("" when absent)
        and the header lines to forward, ending with this router's ``X-Fdcore-Via``."""
        request_id = ""
        via = self.router_id
        lines: list[bytes] = []
        skip = self._skip
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                try:
                    request_id = check_request_id(value.decode("latin-1"), "x-request-id")
                except BadRequestId as exc:
                    raise APIError(400, str(exc), param="x-request-id") from None
            elif name == VIA_HEADER:
                hops = value.split(b",")
                if self.router_id in (hop.strip() for hop in hops) or len(hops) >= _MAX_HOPS:
                    raise APIError(508, "request loop: this request has already passed "
                                      "through this router (an instance registered under "
                                      "the router's own address?)", type_="loop_detected")
                via = value + b"," + self.router_id
            elif bad_header_value(value):
                raise APIError(400, f"header {name.decode('latin-1')!r}: contains control "
                                  "characters and cannot be forwarded", param=None)
            elif name not in skip:
                lines += (name, b": ", value, b"\r\n")
        lines += (VIA_HEADER, b": ", via, b"\r\n")
        return request_id, lines

    def head(self, ex: Exchange, request_id: str) -> bytes:
        """The upstream request head for ``ex`` (without Host and Content-Length), sent as
        ``request_id``."""
        return b"".join((b"POST ", _PATHS[ex.endpoint], b" HTTP/1.1\r\n", *ex.lines,
                         b"x-request-id: ", request_id.encode("ascii"), b"\r\n"))

    async def _handle(self, ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        ex.request_id, ex.lines = self._read_head(scope)
        ex.body = await read_body(scope, receive, self.max_body)
        payload = ex.payload = check_common(parse_json(ex.body))
        prompt = PROMPT_READERS[ex.endpoint](payload)
        if not ex.request_id:
            # Unique, not secret: the cheapest 128 random bits.
            ex.request_id = payload.get("request_id") or f"{random.getrandbits(128):032x}"
        ex.route = RouteRequest(ex.request_id, ex.endpoint, prompt, payload, len(prompt),
                                Role.MIXED)
        ex.stream = payload.get("stream") is True
        task = asyncio.current_task()
        assert task is not None

        def gone() -> None:
            ex.gone = True

        self._active[ex] = task
        try:
            # A client that leaves raises ClientGone here; the drain cancels this task.
            await until_disconnect(receive, self.dispatch(ex, send), gone)
        except asyncio.CancelledError:
            if not ex.drained:
                raise
            task.uncancel()
            raise Drained from None
        finally:
            del self._active[ex]

    async def route_mixed(self, ex: Exchange, send: Send) -> None:
        """The mixed dispatch: one instance answers; another is tried only when none of the
        answer has arrived (connect failures, up to ``proxy.max-retries``)."""
        exclude: set[str] = set()
        head, stream = self.head(ex, ex.request_id), ex.stream
        while True:
            try:
                lease = await self.selector.acquire(ex.route, frozenset(exclude))
            except NoInstance as exc:  # 503, or 429 with Retry-After when all are full
                await self.reply_error(ex, send, exc.status, str(exc), exc.type,
                                        retry_after=exc.retry_after)
                return
            outcome = Outcome.ERROR
            try:
                outcome = await self.exchange(ex, lease, head, ex.body, send)
                return
            except asyncio.CancelledError:
                # Neither a client leaving nor the router draining is the instance's fault.
                outcome = Outcome.DISCONNECT if ex.gone or ex.drained else Outcome.ERROR
                raise
            except ConnectFailed as exc:
                exclude.add(lease.instance.url)
                self.metrics.retries.labels(lease.instance.url).inc()
                log.warning("connect failed", request_id=ex.request_id,
                            instance=lease.instance.url, error=str(exc), attempt=len(exclude))
                if len(exclude) > self.config.max_retries:
                    await self.reply_error(
                        ex, send, 502,
                        f"could not reach an instance after {len(exclude)} attempts: {exc}",
                        "bad_gateway",
                    )
                    return
            except (TimeoutError, ResponseFailed) as exc:
                outcome = await self.answer_failure(ex, send, exc, lease.instance.url)
                return
            finally:
                lease.release(outcome, ex.upstream_status, stream and ex.upstream_status == 200,
                              ex.first_byte_at, ex.answer)

    async def answer_failure(
        self, ex: Exchange, send: Send, exc: TimeoutError | ResponseFailed, url: str
    ) -> Outcome:
        """Tell the client that the instance at ``url`` timed out or failed (an error event
        when its stream had started); the outcome to release the lease with."""
        if isinstance(exc, TimeoutError):
            if ex.status:  # a stream had started: end it with an error event
                await _end_stream(send, 504, f"instance {url} timed out after "
                                  f"{self.config.total_timeout_secs}s", "timeout")
            else:
                await self.reply_error(ex, send, 504, f"instance {url} did not answer within "
                                       f"{self._first_byte_timeout(ex.stream)}s", "timeout")
            return Outcome.TIMEOUT
        if not ex.status:
            await self.reply_error(ex, send, 502, f"instance {url} failed: {exc}",
                                   "bad_gateway")
        return Outcome.ERROR

    def _first_byte_timeout(self, stream: bool) -> float:
        config = self.config
        first_byte = min(config.first_byte_timeout_secs, config.total_timeout_secs)
        return min(first_byte, config.stream_idle_timeout_secs) if stream else first_byte

    async def exchange(
        self, ex: Exchange, lease: Lease, head: bytes, body: bytes, send: Send, *,
        labels: tuple[str, str, str] | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (), screen: Screen | None = None,
        upstream_id: str = "",
    ) -> Outcome:
        """Send ``head`` and ``body`` to ``lease``'s instance and relay its answer to the
        client (status and body unchanged); raises what ended it early.

        ``labels``: ``inference_requests_total``'s worker labels (mixed, prefill, decode;
        default: this instance as mixed); ``headers``: more response headers; ``screen``
        sees the answer first; ``upstream_id``: the id ``head`` sends, when not the
        client's.
        """
        instance = lease.instance
        stream = ex.stream
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.total_timeout_secs
        # A streaming instance answers headers at once; one that sends nothing for the idle
        # gap is stopped or wedged, whatever the (long) first-byte timeout says.
        first_byte = self._first_byte_timeout(stream)
        # One timer: the first-byte deadline, then moved to the total deadline.
        async with asyncio.timeout(first_byte) as timer:
            upstream = await self.pool.request(
                instance.host_ip, instance.port, head, body,
                (upstream_id or ex.request_id).encode("ascii"),
            )
            timer.reschedule(deadline)
            ex.first_byte_at = now = time.perf_counter()
            ex.upstream_status = upstream.status
            self.metrics.child(self.metrics.ttfb, ex.endpoint).observe(now - ex.started)
            self.metrics.child(
                self.metrics.inference_requests, *(labels or (instance.url, "", "")),
                str(upstream.status)
            ).inc()
            reply = [
                (b"content-type", upstream.content_type),
                (b"x-request-id", ex.request_id.encode("ascii")),
                (b"x-router-instance-url", instance.url.encode()),
                *headers,
            ]
            if stream and upstream.status == 200:
                return await self._relay(ex, upstream, reply, send, instance.url, screen)
            try:
                data = await upstream.read()
            except BaseException:
                upstream.close()
                raise
            upstream.release()
            if screen is not None:
                screen.answer(upstream.status, data)
            ex.status = upstream.status
            ex.answer = data
            reply.append((b"content-length", str(len(data)).encode()))
            await send({"type": "http.response.start", "status": upstream.status,
                        "headers": reply})
            await send({"type": "http.response.body", "body": data})
            return Outcome.SUCCESS if upstream.status < 500 else Outcome.ERROR

    async def _relay(
        self, ex: Exchange, upstream: UpstreamResponse, headers: list[tuple[bytes, bytes]],
        send: Send, url: str, screen: Screen | None = None,
    ) -> Outcome:
        headers.append((b"cache-control", b"no-cache"))
        start = {"type": "http.response.start", "status": upstream.status, "headers": headers}
        held = b""  # what the screen has not let through yet
        if screen is None:
            ex.status = upstream.status
            await send(start)
        done = False
        gap = self.config.stream_idle_timeout_secs
        loop = asyncio.get_running_loop()
        last = previous = b""  # the stream's last two chunks: where its ``usage`` would be
        try:
            # One timer for the whole stream, pushed back by every chunk that arrives.
            async with asyncio.timeout(loop.time() + gap) as idle:
                async for chunk in upstream.chunks():
                    idle.reschedule(loop.time() + gap)
                    previous, last = last, chunk
                    if not ex.status:
                        assert screen is not None
                        held += chunk
                        if not screen.ready(held):
                            continue
                        ex.status = upstream.status
                        await send(start)
                        chunk, held = held, b""
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not ex.status:  # the stream ended while held: the client has it all now
                ex.status = upstream.status
                await send(start)
                await send({"type": "http.response.body", "body": held, "more_body": True})
            done = True
        except ResponseFailed as exc:
            if not ex.status:
                raise  # still held: the client has seen nothing, the dispatch answers
            await _end_stream(send, 502, f"instance {url} failed mid-stream: {exc}",
                              "bad_gateway")
            return Outcome.ERROR
        except TimeoutError:
            if not idle.expired() or not ex.status:
                raise  # the total deadline, or still held: the dispatch answers
            await _end_stream(send, 504, f"instance {url} sent nothing for {gap}s "
                              "(proxy.stream-idle-timeout-secs)", "timeout")
            return Outcome.TIMEOUT
        finally:
            ex.answer = previous + last
            if not done:
                upstream.close()  # closing is what tells the instance to stop generating
        upstream.release()
        await send({"type": "http.response.body", "body": b""})
        return Outcome.SUCCESS

    async def reply_error(
        self, ex: Exchange, send: Send, status: int, message: str, type_: str,
        param: str | None = None, retry_after: int | None = None, code: str | None = None,
    ) -> None:
        ex.status = status
        headers = [(b"content-type", _JSON)]
        if ex.request_id:
            headers.append((b"x-request-id", ex.request_id.encode("ascii")))
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": error_body(status, message, type_,
                                                                     param, code)})


async def _end_stream(send: Send, status: int, message: str, type_: str) -> None:
    """Finish a started SSE stream with an error event."""
    event = error_event(status, message, type_)
    await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
