"""Hostile request ids on the engine: a clear 400 with a JSON body, never a 500 or a dropped
connection, and the engine keeps serving (the engine echoes ids in response headers)."""

from __future__ import annotations

import socket

import orjson
import pytest

from tests.engine.conftest import Engine

BODY_IDS = ["a\r\nx-injected: 1", "line\nfeed", "nul\x00", "bell\x07", "tab\tid", "space id",
            "caf\u00e9", "\u4e2d\u6587", "x" * 257]
HEADER_IDS = [b"a\x01b", b"tab\tid", b"space id", b"\xff\xfe", b"caf\xc3\xa9", b"x" * 257]


def _raw(engine: Engine, head: bytes, body: bytes) -> tuple[int, bytes]:
    """One request on a fresh socket; the status and the raw answer (the server must answer)."""
    with socket.create_connection(("127.0.0.1", engine.port), timeout=30) as sock:
        sock.sendall(head + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        answer = b""
        while not _complete(answer):
            chunk = sock.recv(65536)
            assert chunk, f"connection dropped without an answer: {answer!r}"
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


@pytest.mark.parametrize("rid", BODY_IDS)
def test_hostile_body_request_id_is_400(engine: Engine, rid: str) -> None:
    status, body = engine.request("POST", "/v1/completions",
                                  {"prompt": "x", "max_tokens": 1, "request_id": rid})
    assert status == 400, body
    assert body["error"]["param"] == "request_id"


@pytest.mark.parametrize("rid", HEADER_IDS)
def test_hostile_header_request_id_is_400(engine: Engine, rid: bytes) -> None:
    payload = orjson.dumps({"prompt": "x", "max_tokens": 1})
    head = (b"POST /v1/completions HTTP/1.1\r\nhost: e\r\ncontent-type: application/json\r\n"
            b"x-request-id: " + rid + b"\r\n")
    status, answer = _raw(engine, head, payload)
    assert status == 400, answer[:300]
    assert b"x-request-id" in answer
    assert engine.complete("x", max_tokens=1, request_id="after")["id"] == "cmpl-after"
