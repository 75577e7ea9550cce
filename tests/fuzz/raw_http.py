"""HTTP over a raw socket, for requests no client library would send: one exchange per fresh
connection, and what counts as a well-answered one."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass
class Answer:
    """An HTTP answer read off a raw socket."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON."""
        return orjson.loads(self.body)


def exchange(port: int, raw: bytes) -> Answer:
    """Send ``raw`` on a fresh connection and read one answer; fail if none comes back.

    The server may close the connection after answering (it must for a head it cannot parse);
    closing without a byte is a dropped connection.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        # It may answer and close before reading everything; the answer still counts.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        data = b""
        while (answer := _parse(data)) is None:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                answer = _parse(data, closed=True)
                assert answer is not None, f"connection dropped without an answer: {data!r}"
                return answer
            data += chunk
    return answer


def _parse(data: bytes, closed: bool = False) -> Answer | None:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        size = int(headers[b"content-length"])
        if len(rest) < size:
            return None
        body = rest[:size]
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        if not rest.endswith(b"0\r\n\r\n"):
            return None
        body = _dechunk(rest)
    elif not closed:
        return None
    else:
        body = rest
    return Answer(int(status_line.split(b" ", 2)[1]), headers, body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2:]


def assert_answered_well(answer: Answer, json_error: bool) -> None:
    """No 5xx, and a 4xx carries a JSON error body with a message when ``json_error``.

    Pass ``json_error=False`` for a head the HTTP server itself may refuse: its own plain 400
    (the app never saw the request) counts as answered.
    """
    assert answer.status < 500, (answer.status, answer.body[:500])
    if not 400 <= answer.status < 500:
        return
    if json_error or answer.headers.get(b"content-type", b"").startswith(b"application/json"):
        error = answer.json()["error"]
        assert isinstance(error["message"], str) and error["message"], answer.body[:500]
    else:
        assert answer.status == 400, (answer.status, answer.body[:500])


def head(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A raw HTTP/1.1 request with ``Content-Length`` and ``Connection: close``."""
    lines = [method + b" " + path + b" HTTP/1.1", b"host: fuzz", b"connection: close",
             *(name + b": " + value for name, value in headers),
             b"content-length: " + str(len(body)).encode()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
