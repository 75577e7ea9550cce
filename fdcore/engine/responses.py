"""Server-sent event streams that stop when the client leaves."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fdcore.http import ClientGone, until_disconnect


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterator of encoded events.

    A disconnect (seen on ``receive`` or as a failed send) calls ``on_disconnect`` and stops
    the iteration.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        on_disconnect: Callable[[], None],
        headers: dict[str, str] | None = None,
    ) -> None:
        # No body attribute: the headers then carry no Content-Length (the body is streamed).
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", **(headers or {})})
        self.events = events
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnect(receive, self._send(send), self.on_disconnect)
        except ClientGone:
            pass  # nobody reads the rest; on_disconnect has stopped the request
        except OSError:
            self.on_disconnect()

    async def _send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
