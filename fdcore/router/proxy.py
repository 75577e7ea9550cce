"""The streaming proxy: one inference request in, one instance's answer out, chunk by chunk."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive

from fdcore.config import ProxyConfig
from fdcore.router.errors import ClientError, error_body, error_response
from fdcore.router.metrics import RouterMetrics
from fdcore.router.prompts import PROMPT_READERS, check_common
from fdcore.router.selection import Lease, NoInstance, Selector
from fdcore.types import Outcome, Role, RouteRequest

log = structlog.get_logger("fdcore.proxy")
T = TypeVar("T")

# Headers that describe one hop's connection or body framing, never forwarded.
_HOP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "content-length", "host", "accept-encoding",
})
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError)
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class AnswerFailed(Exception):
    """The instance sent response headers, then failed: never retried (it may have generated)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"request body is {declared} bytes; the limit is {limit}",
                          type_="request_too_large")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"request body exceeds the limit of {limit} bytes",
                              type_="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first (then cancel it, raise ClientGone).

    Once the body has been read, the only message left on ``receive`` is ``http.disconnect``.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(receive())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    raise ClientGone


class Proxy:
    """Forwards OpenAI requests to instances chosen by the :class:`Selector`.

    Retries on another instance only when the connection fails before any byte was sent back;
    relays the instance's status and body unchanged; releases the lease however it ends.
    """

    def __init__(
        self, selector: Selector, metrics: RouterMetrics, config: ProxyConfig, max_body: int,
        splitwise: bool = False,
    ) -> None:
        self.splitwise = splitwise
        self.selector = selector
        self.metrics = metrics
        self.config = config
        self.max_body = max_body
        self.session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=config.total_timeout_secs, sock_connect=config.connect_timeout_secs,
            connect=config.connect_timeout_secs,
        )

    async def start(self) -> None:
        """Open the pooled upstream client."""
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True),
            timeout=self._timeout, auto_decompress=False, skip_auto_headers=("User-Agent",),
        )

    async def stop(self) -> None:
        """Close the upstream client."""
        if self.session is not None:
            await self.session.close()

    def handler(self, endpoint: str) -> Callable[[Request], Awaitable[Response]]:
        """A Starlette endpoint forwarding to ``endpoint`` (``chat`` or ``completions``)."""

        async def endpoint_handler(request: Request) -> Response:
            started = time.perf_counter()
            request_id = request.headers.get("x-request-id") or ""
            try:
                response = await self._forward(request, endpoint, request_id, started)
            except ClientError as exc:
                response = error_response(
                    exc.status, exc.message, exc.type, exc.param,
                    headers={"x-request-id": request_id} if request_id else None,
                )
            except ClientGone:
                response = Response(status_code=499)
            if not isinstance(response, StreamingResponse):
                self._observe(endpoint, response.status_code, started,
                              response.headers.get("x-request-id", request_id))
            return response

        return endpoint_handler

    def _observe(self, endpoint: str, status: int, started: float, request_id: str = "") -> None:
        elapsed = time.perf_counter() - started
        self.metrics.count_request(ENDPOINT_PATHS[endpoint], status)
        self.metrics.latency.labels(endpoint).observe(elapsed)
        log.debug("request done", request_id=request_id, endpoint=endpoint, status=status,
                  seconds=round(elapsed, 6))

    async def _forward(
        self, request: Request, endpoint: str, request_id: str, started: float
    ) -> Response:
        if self.splitwise:
            # Instances register with their roles already; pairing them comes with PD routing.
            raise ClientError(501, "prefill/decode (splitwise) routing is not available in this "
                              "version; run the router without --splitwise",
                              type_="not_implemented")
        body = await read_body(request, self.max_body)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ClientError(400, f"request body is not valid JSON: {exc}") from None
        check_common(payload)
        prompt = PROMPT_READERS[endpoint](payload)
        if not request_id:
            request_id = payload.get("request_id") or uuid.uuid4().hex
        route = RouteRequest(request_id, endpoint, prompt, payload, len(prompt), Role.MIXED)
        stream = bool(payload.get("stream", False))
        headers = {k: v for k, v in request.headers.items() if k not in _HOP_HEADERS}
        headers["x-request-id"] = request_id
        path = ENDPOINT_PATHS[endpoint]
        exclude: set[str] = set()
        while True:
            try:
                lease = await self.selector.acquire(route, frozenset(exclude))
            except NoInstance as exc:
                return error_response(503, str(exc), "service_unavailable",
                                      headers={"x-request-id": request_id})
            try:
                upstream, data = await until_disconnect(
                    request.receive, self._exchange(lease, path, body, headers, stream)
                )
            except ClientGone:
                lease.release(Outcome.DISCONNECT)
                log.info("client disconnected", request_id=request_id, instance=lease.instance.url)
                raise
            except AnswerFailed as exc:
                timed_out = isinstance(exc.cause, TimeoutError)
                lease.release(Outcome.TIMEOUT if timed_out else Outcome.ERROR)
                return error_response(
                    504 if timed_out else 502,
                    f"instance {lease.instance.url} failed mid-answer: {exc.cause!r}",
                    "timeout" if timed_out else "bad_gateway",
                    headers={"x-request-id": request_id},
                )
            except _CONNECT_ERRORS as exc:
                lease.release(Outcome.ERROR)
                exclude.add(lease.instance.url)
                self.metrics.retries.labels(lease.instance.url).inc()
                log.warning("connect failed", request_id=request_id,
                            instance=lease.instance.url, error=str(exc), attempt=len(exclude))
                if len(exclude) > self.config.max_retries:
                    return error_response(
                        502, f"could not reach an instance after {len(exclude)} attempts: {exc}",
                        "bad_gateway", headers={"x-request-id": request_id},
                    )
                continue
            except TimeoutError:
                lease.release(Outcome.TIMEOUT)
                return error_response(
                    504, f"instance {lease.instance.url} did not answer within "
                    f"{self.config.first_byte_timeout_secs}s", "timeout",
                    headers={"x-request-id": request_id},
                )
            except aiohttp.ClientError as exc:
                lease.release(Outcome.ERROR)
                return error_response(502, f"instance {lease.instance.url} failed: {exc}",
                                      "bad_gateway", headers={"x-request-id": request_id})
            self.metrics.ttfb.labels(endpoint).observe(time.perf_counter() - started)
            self.metrics.inference_requests.labels(
                lease.instance.url, "", "", str(upstream.status)
            ).inc()
            log.debug("forwarded", request_id=request_id, instance=lease.instance.url,
                      status=upstream.status, stream=stream)
            out_headers = {"x-request-id": request_id, "x-router-instance-url": lease.instance.url}
            content_type = upstream.headers.get("content-type", "application/json")
            if data is None:
                return StreamingResponse(
                    self._relay(upstream, lease, endpoint, started), status_code=upstream.status,
                    headers={**out_headers, "cache-control": "no-cache"}, media_type=content_type,
                )
            lease.release(Outcome.SUCCESS if upstream.status < 500 else Outcome.ERROR)
            return Response(data, status_code=upstream.status, headers=out_headers,
                            media_type=content_type)

    async def _exchange(
        self, lease: Lease, path: str, body: bytes, headers: dict[str, str], stream: bool
    ) -> tuple[aiohttp.ClientResponse, bytes | None]:
        """POST and wait for the response headers; read the whole body unless it streams.

        One task per request does both, so a client disconnect is watched with one watcher.
        """
        assert self.session is not None
        async with asyncio.timeout(self.config.first_byte_timeout_secs):
            upstream = await self.session.post(
                lease.instance.url + path, data=body, headers=headers
            )
        if stream and upstream.status == 200:
            return upstream, None
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            upstream.close()
            raise AnswerFailed(exc) from exc
        except asyncio.CancelledError:
            upstream.close()
            raise
        upstream.release()
        return upstream, data

    async def _relay(
        self, upstream: aiohttp.ClientResponse, lease: Lease, endpoint: str, started: float
    ) -> AsyncIterator[bytes]:
        outcome = Outcome.DISCONNECT
        status = 200
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
            outcome = Outcome.SUCCESS
        except TimeoutError:
            outcome, status = Outcome.TIMEOUT, 504
            yield _sse_error(504, f"instance {lease.instance.url} timed out mid-stream", "timeout")
        except aiohttp.ClientError as exc:
            outcome, status = Outcome.ERROR, 502
            yield _sse_error(502, f"instance {lease.instance.url} failed mid-stream: {exc}",
                             "bad_gateway")
        finally:
            if outcome is Outcome.SUCCESS:
                upstream.release()
            else:
                # Closing the connection is what tells the instance to stop generating.
                upstream.close()
                if outcome is Outcome.DISCONNECT:
                    status = 499
                    log.info("client disconnected mid-stream", request_id=lease.request.request_id,
                             instance=lease.instance.url)
            lease.release(outcome)
            self._observe(endpoint, status, started, lease.request.request_id)


def _sse_error(status: int, message: str, type_: str) -> bytes:
    return b"data: " + error_body(status, message, type_) + b"\n\n"


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
