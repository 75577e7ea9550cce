"""The HTTP edge both servers share: OpenAI's error body, bounded body reads, disconnect
watching, and which request ids and header values are accepted.

Anything a server writes into an HTTP head (a request line or header upstream, a response
header back) must be unable to end that head early: a client-chosen value with CR or LF in it
would otherwise smuggle a second message onto a pooled connection, and every later client on
that connection would read someone else's answer.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope

T = TypeVar("T")

MAX_REQUEST_ID = 256
# Visible ASCII only: no space, no control characters, nothing a latin-1 header cannot carry.
_REQUEST_ID = re.compile(rf"[!-~]{{1,{MAX_REQUEST_ID}}}")
# RFC 9110 field-value: visible characters, obs-text, space and tab; never CR, LF, NUL or
# another control character.
_BAD_HEADER_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

REQUEST_ID_RULE = (
    f"1 to {MAX_REQUEST_ID} visible ASCII characters (no spaces or control characters)"
)
INVALID_REQUEST = "invalid_request_error"


class BadRequestId(ValueError):
    """A request id that cannot be accepted; the message names where it came from."""


def check_request_id(value: object, where: str) -> str:
    """Return ``value`` if it is an acceptable request id, else raise :class:`BadRequestId`."""
    if isinstance(value, str) and _REQUEST_ID.fullmatch(value):
        return value
    if not isinstance(value, str):
        raise BadRequestId(f"{where}: must be a string, got {type(value).__name__}")
    raise BadRequestId(f"{where}: must be {REQUEST_ID_RULE}")


def bad_header_value(value: bytes) -> bool:
    """Whether a header value cannot be forwarded as it is (it could break the framing).

    Names need no check here: both servers' parsers (httptools, h11) refuse a request whose
    header name is not an RFC 9110 token before the app sees it.
    """
    return _BAD_HEADER_VALUE.search(value) is not None


def error_object(
    status: int, message: str, type_: str = INVALID_REQUEST, param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``.

    ``code`` is always a string (OpenAI's clients type it ``str | None``): the failure's name
    where it has one (``context_length_exceeded``), else the HTTP status (``"404"``).
    """
    return {"error": {
        "message": message, "type": type_, "param": param, "code": code or str(status),
    }}


def error_body(
    status: int, message: str, type_: str = INVALID_REQUEST, param: str | None = None,
    code: str | None = None,
) -> bytes:
    """:func:`error_object` as JSON."""
    return orjson.dumps(error_object(status, message, type_, param, code))


def error_event(
    status: int, message: str, type_: str = INVALID_REQUEST, code: str | None = None
) -> bytes:
    """The server-sent event that ends a started stream with :func:`error_body`."""
    return b"data: " + error_body(status, message, type_, None, code) + b"\n\n"


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """An ``application/json`` response encoded with orjson."""
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def error_response(
    status: int, message: str, type_: str = INVALID_REQUEST, param: str | None = None,
    code: str | None = None, headers: dict[str, str] | None = None,
) -> Response:
    """:func:`error_body` as a response with ``status``."""
    return Response(error_body(status, message, type_, param, code), status, headers,
                    media_type="application/json")


class APIError(Exception):
    """A request that fails with ``status``; either server answers it with :func:`error_body`."""

    def __init__(
        self, status: int, message: str, type_: str = INVALID_REQUEST,
        param: str | None = None, code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> bytes:
        """This error as :func:`error_body`."""
        return error_body(self.status, self.message, self.type, self.param, self.code)

    def response(self, headers: dict[str, str] | None = None) -> Response:
        """This error as :func:`error_response`."""
        return error_response(self.status, self.message, self.type, self.param, self.code,
                              headers)


class ClientGone(ClientDisconnect):
    """The client disconnected before its answer was complete.

    A Starlette ``ClientDisconnect``, so a Starlette app's handler for that one answers it too.
    """


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body; an :class:`APIError` 413 as soon as it is known to exceed ``limit``
    bytes (before reading, when ``Content-Length`` says so), :class:`ClientGone` if the client
    leaves before its last byte."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise _too_large(f"request body is {int(value)} bytes; the limit is {limit}")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(message: str) -> APIError:
    return APIError(413, message, "request_too_large", code="body_too_large")


def parse_json(body: bytes) -> Any:
    """``body`` decoded as JSON, or an :class:`APIError` 400 naming where it is malformed."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(
    receive: Receive, work: Awaitable[T], on_disconnect: Callable[[], None]
) -> T:
    """Await ``work`` in this task, its body already read; if the client disconnects first,
    call ``on_disconnect``, cancel ``work`` and raise :class:`ClientGone`.

    ``on_disconnect`` runs before the cancellation arrives, so what ``work`` does on
    ``CancelledError`` can tell a client that left (it set a flag) from another cancel, which
    propagates as it came.
    """
    task = asyncio.current_task()
    assert task is not None
    gone = finished = False

    def leave(watch: asyncio.Future[None]) -> None:
        nonlocal gone
        # ``finished``: a done watch's callback is already scheduled; removing it is too late.
        if finished or watch.cancelled():
            return
        watch.exception()  # a receive that failed is a lost client too
        gone = True
        on_disconnect()
        task.cancel()

    watch = asyncio.ensure_future(_disconnected(receive))
    watch.add_done_callback(leave)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientGone from None
    finally:
        finished = True
        watch.remove_done_callback(leave)
        watch.cancel()
