"""uvicorn's httptools protocol with a header deadline, a body deadline and a connection cap.

uvicorn arms no timer while a request is being received: a client that connects and sends
nothing, or one header byte at a time, held its connection forever (with the default 1,024
file descriptors the router answered 503 for 40 s under slowloris), and 20 clients that sent
10 MB of a declared 30 MB body held 200 MB for as long as they liked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fdcore.http import error_body
from fdcore.server_limits import ServerLimits, reject_over_cap

_LINGER_SECONDS = 2.0
# httptools sets no bound on a request head; hypercorn's h11 stops at 16 KiB, nginx at 32 KiB.
MAX_HEAD_BYTES = 64 * 1024
_HEAD_TOO_LARGE_BODY = error_body(
    431, f"the request line and headers exceed {MAX_HEAD_BYTES} bytes",
    "request_header_fields_too_large",
)
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_HEAD_TOO_LARGE_BODY)).encode() +
    b"\r\n\r\n" + _HEAD_TOO_LARGE_BODY
)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """One connection: its header and body timers, and whether it is over the cap.

    * header timer: from connect (or the first byte of a later request) to the end of the
      headers; on expiry the connection closes without an answer, as nginx does, since no
      request has arrived to answer;
    * body timer: from the end of the headers to the end of the body; on expiry the connection
      closes, so the app's ``receive()`` returns ``http.disconnect`` and it drops what it
      buffered;
    * over ``max_connections``: its request is answered 503 with a JSON body and it closes
      (answering after the request is read, so that the client is not reset mid-send).

    Subclasses made by :func:`protocol_class` set ``limits`` and ``draining``.
    """

    limits: ServerLimits
    draining: Callable[[], bool]
    _timer: asyncio.TimerHandle | None = None
    _in_head = True  # between a request's first byte (or the connection) and its last header
    _head_bytes = 0
    _refused = False

    def data_received(self, data: bytes) -> None:
        """Parse, then refuse a request head that grows past :data:`MAX_HEAD_BYTES` (431)."""
        if self._refused:
            return  # lingering close: read and drop what the client still sends
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if (self._in_head and self._head_bytes > MAX_HEAD_BYTES
                and not self.transport.is_closing()):
            self._refuse()

    def _refuse(self) -> None:
        # Closing with unread client bytes makes the kernel send a reset that can destroy the
        # answer in flight; like nginx's lingering close, answer, stop writing, keep reading
        # (and dropping) until the client closes or a short timer ends it.
        self._refused = True
        self.transport.write(_HEAD_TOO_LARGE)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm(_LINGER_SECONDS)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the connection; start its header timer."""
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.logger.warning("connection cap reached: answering 503 (%d open)",
                                len(self.connections))
            self.app = reject_over_cap
        self._arm(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection and its timer."""
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        """A request's first byte: its headers are due within the header timeout."""
        super().on_message_begin()
        self._arm(self.limits.header_timeout)

    def on_headers_complete(self) -> None:
        """Headers done: the body is due within the body timeout."""
        self._in_head = False
        self._arm(self.limits.body_timeout)
        super().on_headers_complete()
        if self.draining() and self.cycle is not None:
            self.cycle.keep_alive = False  # answer, then close: the server is going away

    def on_message_complete(self) -> None:
        """The whole request has arrived."""
        self._in_head, self._head_bytes = True, 0
        self._disarm()
        super().on_message_complete()

    def begin_drain(self) -> None:
        """The server drains: close after the current answer if its head is not sent yet (it
        then says ``connection: close``). An answer whose head already went out promised a
        kept-alive connection: closing after it would race the client's next request, so that
        connection, like an idle one, stays open until its keep-alive timer or its next request
        (answered, then closed)."""
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.keep_alive = False

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_class(limits: ServerLimits, draining: Callable[[], bool]) -> type[HttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` bound to ``limits``."""
    return type("FdcoreHttpToolsProtocol", (LimitedHttpToolsProtocol,),
                {"limits": limits, "draining": staticmethod(draining)})
