"""A lean HTTP/1.1 client for the proxy's upstream calls: pooled keep-alive connections,
one write per request, responses parsed by httptools.

The router's hot path is one request in and one out; a general-purpose client spends most of
its time on features this path never uses (cookies, redirects, tracing, auto headers).

A pooled connection is only reused when its framing is beyond doubt: exactly one response
arrived, it started after the request was written, and nothing followed it. Bytes on an idle
connection, a second response after the first, or a response whose ``x-request-id`` names a
different request mean the connection is out of step with its requests (a smuggled request,
a confused instance), and reusing it would hand one client another's answer: it is closed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools

_HIGH_WATER = 1 << 20  # pause reading a stream the client is slower than


class ConnectFailed(Exception):
    """No response byte arrived: the connection failed or closed first (safe to retry)."""


class ResponseFailed(Exception):
    """The response started, then the connection failed (never retried)."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self._reset(b"")

    def _reset(self, request_id: bytes) -> None:
        self.request_id = request_id
        self.in_flight = False  # a request was written and its response is not complete
        self.messages = 0
        self.started = False
        self.complete = False
        self.status = 0
        self.keep_alive = False
        self.content_type = b"application/json"
        self.headers_ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.readable = asyncio.Event()
        self.error: Exception | None = None
        self.mismatch: bytes | None = None
        self.paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.in_flight:
            # Nobody asked for these bytes: an answer to a request we did not send.
            self.close()
            return
        self.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ResponseFailed(f"malformed response: {exc}"))
            self.close()
            return
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            reason = f"connection closed{f': {exc}' if exc else ''}"
            self._fail(ResponseFailed(reason) if self.started else ConnectFailed(reason))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.messages += 1
        if self.messages > 1:
            # A second response on one request: the framing is lost. The first one (complete,
            # already buffered) stands; the connection goes.
            self.in_flight = False
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.messages != 1:
            return
        lower = name.lower()
        if lower == b"content-type":
            self.content_type = value
        elif lower == b"x-request-id" and self.request_id and value != self.request_id:
            self.mismatch = value

    def on_headers_complete(self) -> None:
        if self.messages != 1:
            return
        if self.mismatch is not None:
            self._fail(ResponseFailed(
                f"the response names request {self.mismatch[:64]!r}, not the one sent"))
            self.close()
            return
        self.status = self.parser.get_status_code()
        # Read here: httptools resets its keep-alive answer once the message completes.
        self.keep_alive = self.parser.should_keep_alive()
        if not self.headers_ready.done():
            self.headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.messages != 1 or self.error is not None:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        self.readable.set()

    def on_message_complete(self) -> None:
        if self.messages == 1:
            self.complete = True
            self.in_flight = False
        self.readable.set()

    def _fail(self, error: Exception) -> None:
        self.error = error
        if not self.headers_ready.done():
            self.headers_ready.set_exception(error)
            self.headers_ready.exception()  # retrieved here; the waiter re-raises it
        self.readable.set()

    def send(self, request: bytes) -> None:
        """Write one whole request."""
        assert self.transport is not None
        self.in_flight = True
        self.transport.write(request)

    def close(self) -> None:
        """Drop the connection (the upstream sees the request as cancelled)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """Status, content type and body of one upstream answer."""

    __slots__ = ("_conn", "content_type", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self.content_type = conn.content_type

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive (chunked encoding already removed)."""
        conn = self._conn
        while True:
            while conn.chunks:
                chunk = conn.chunks.popleft()
                conn.buffered -= len(chunk)
                if conn.paused and conn.buffered < _HIGH_WATER // 2 and conn.transport:
                    conn.paused = False
                    conn.transport.resume_reading()
                yield chunk
            if conn.complete:
                return
            if conn.error is not None:
                raise ResponseFailed(str(conn.error)) from conn.error
            conn.readable.clear()
            await conn.readable.wait()

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.chunks()])

    def release(self) -> None:
        """Return the connection to the pool if it finished cleanly, else close it."""
        self._conn.pool.release(self._conn)

    def close(self) -> None:
        """Abort: close the connection."""
        self._conn.close()


class UpstreamPool:
    """Keep-alive connections per ``(host, port)``."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def request(
        self, host: str, port: int, head: bytes, body: bytes, request_id: bytes = b""
    ) -> UpstreamResponse:
        """Send ``head`` (request line and headers, without Host and Content-Length) and
        ``body``; return once the response headers are in.

        ``request_id`` is the ``x-request-id`` sent in ``head``: a response that carries a
        different one is refused (:class:`ResponseFailed`) and its connection closed.
        A pooled connection that turns out to be closed is replaced once, transparently.
        """
        key = (host, port)
        request = b"".join((
            head, b"host: ", f"{host}:{port}".encode(), b"\r\ncontent-length: ",
            str(len(body)).encode(), b"\r\n\r\n", body,
        ))
        conn = self._take(key, request_id)
        if conn is not None:
            try:
                return await self._exchange(conn, request)
            except ConnectFailed:
                pass  # the instance had closed this idle connection: use a new one
        conn = await self._connect(key)
        conn._reset(request_id)
        return await self._exchange(conn, request)

    @staticmethod
    async def _exchange(conn: _Connection, request: bytes) -> UpstreamResponse:
        conn.send(request)
        try:
            await conn.headers_ready
        except BaseException:
            conn.close()
            raise
        return UpstreamResponse(conn)

    def _take(self, key: tuple[str, int], request_id: bytes) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn._reset(request_id)
                return conn
        return None

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self, key), *key)
        except TimeoutError:
            raise ConnectFailed(f"connect to {key[0]}:{key[1]} timed out") from None
        except OSError as exc:
            raise ConnectFailed(f"connect to {key[0]}:{key[1]} failed: {exc}") from exc
        return conn

    def release(self, conn: _Connection) -> None:
        """Keep a finished connection for reuse; close one that is not reusable."""
        if conn.closed or not conn.complete or not conn.keep_alive or conn.messages != 1:
            conn.close()
            return
        self._idle.setdefault(conn.key, []).append(conn)

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
