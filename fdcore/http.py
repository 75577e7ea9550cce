"""The HTTP edge rules both servers share: which request ids and header values are accepted.

Anything a server writes into an HTTP head (a request line or header upstream, a response
header back) must be unable to end that head early: a client-chosen value with CR or LF in it
would otherwise smuggle a second message onto a pooled connection, and every later client on
that connection would read someone else's answer.
"""

from __future__ import annotations

import re

MAX_REQUEST_ID = 256
# Visible ASCII only: no space, no control characters, nothing a latin-1 header cannot carry.
_REQUEST_ID = re.compile(rf"[!-~]{{1,{MAX_REQUEST_ID}}}")
# RFC 9110 field-value: visible characters, obs-text, space and tab; never CR, LF, NUL or
# another control character.
_BAD_HEADER_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

REQUEST_ID_RULE = (
    f"1 to {MAX_REQUEST_ID} visible ASCII characters (no spaces or control characters)"
)


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
