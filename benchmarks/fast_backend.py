"""A minimal, fast OpenAI-compatible test backend for router benchmarks.

It answers at once, with a small fixed completion, so that a benchmark measures the router
in front of it and not the backend:

* ``POST /v1/chat/completions`` and ``POST /v1/completions``: a fixed JSON completion, or an
  SSE stream (``Transfer-Encoding: chunked``) when the request body has ``"stream": true``;
* ``GET /health``, ``/health_generate``, ``/v1/models``, ``/get_load``: trivial answers;
* ``GET /metrics``: ``fast_backend_completions_total``, the completions answered so far (lets a
  benchmark check that a router really spreads requests over its backends);
* anything else: 404 (the path is printed to stderr once, so missing endpoints are visible).
  Deliberately, there is no ``/server_info`` or ``/model_info``: given a ``model_path`` there,
  sglang-router tries to download that model's tokenizer from the Hugging Face Hub.

It is a raw asyncio ``Protocol`` HTTP/1.1 server (uvloop when installed) with keep-alive and
pipelining, so a single process serves tens of thousands of requests/s per core.

Run: ``python benchmarks/fast_backend.py --port 8001``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import cast

MODEL = "fast-backend"

_CHAT_BODY = json.dumps(
    {
        "id": "chatcmpl-fast-backend",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the fast backend."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14},
    },
    separators=(",", ":"),
).encode()

_COMPLETION_BODY = json.dumps(
    {
        "id": "cmpl-fast-backend",
        "object": "text_completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"index": 0, "text": "Hello from the fast backend.", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14},
    },
    separators=(",", ":"),
).encode()

_MODELS_BODY = json.dumps(
    {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 1_700_000_000, "owned_by": "fdcore"}],
    },
    separators=(",", ":"),
).encode()

_METRICS_HEAD = (
    b"# HELP fast_backend_completions_total Completion requests answered.\n"
    b"# TYPE fast_backend_completions_total counter\n"
    b"fast_backend_completions_total "
)


def _sse_events(chat: bool) -> list[bytes]:
    """The SSE events of a streamed answer: role, two content pieces, finish, ``[DONE]``."""
    pieces = ["Hello from ", "the fast backend."]
    events: list[dict[str, object]] = []
    if chat:
        base: dict[str, object] = {
            "id": "chatcmpl-fast-backend",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": MODEL,
        }
        events.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for piece in pieces:
            events.append(
                {
                    **base,
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                }
            )
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    else:
        base = {
            "id": "cmpl-fast-backend",
            "object": "text_completion",
            "created": 1_700_000_000,
            "model": MODEL,
        }
        for piece in pieces:
            events.append({**base, "choices": [{"index": 0, "text": piece, "finish_reason": None}]})
        events.append({**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
    out = [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events]
    out.append(b"data: [DONE]\n\n")
    return out


def _response(status: bytes, content_type: bytes, body: bytes, close: bool = False) -> bytes:
    """A complete HTTP/1.1 response with ``Content-Length``."""
    conn = b"close" if close else b"keep-alive"
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: "
        + conn
        + b"\r\n\r\n"
        + body
    )


def _sse_response(chat: bool, close: bool = False) -> bytes:
    """A complete chunked ``text/event-stream`` response, one chunk per SSE event."""
    conn = b"close" if close else b"keep-alive"
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: " + conn + b"\r\n\r\n"
    )
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in _sse_events(chat))
    return head + chunks + b"0\r\n\r\n"


_JSON = b"application/json"
_OK = b"200 OK"

# (method, path) -> (keep-alive answer, closing answer)
_STATIC: dict[tuple[bytes, bytes], tuple[bytes, bytes]] = {}


def _static(method: bytes, path: bytes, status: bytes, ctype: bytes, body: bytes) -> None:
    _STATIC[(method, path)] = (
        _response(status, ctype, body),
        _response(status, ctype, body, close=True),
    )


for _m in (b"GET", b"HEAD"):
    _static(_m, b"/health", _OK, b"text/plain", b"OK")
    _static(_m, b"/health_generate", _OK, b"text/plain", b"OK")
    _static(_m, b"/v1/models", _OK, _JSON, _MODELS_BODY)
    _static(_m, b"/get_load", _OK, _JSON, b'{"load":0}')
    _static(_m, b"/load", _OK, _JSON, b'{"load":0}')

_CHAT = (_response(_OK, _JSON, _CHAT_BODY), _response(_OK, _JSON, _CHAT_BODY, close=True))
_COMPL = (
    _response(_OK, _JSON, _COMPLETION_BODY),
    _response(_OK, _JSON, _COMPLETION_BODY, close=True),
)
_CHAT_SSE = (_sse_response(True), _sse_response(True, close=True))
_COMPL_SSE = (_sse_response(False), _sse_response(False, close=True))
_NOT_FOUND = (
    _response(b"404 Not Found", _JSON, b'{"error":"not found"}'),
    _response(b"404 Not Found", _JSON, b'{"error":"not found"}', close=True),
)
_VERSION = _response(
    b"505 HTTP Version Not Supported", _JSON, b'{"error":"HTTP/1.1 only"}', close=True
)
_BAD = _response(b"400 Bad Request", _JSON, b'{"error":"bad request"}', close=True)

_seen_unknown: set[bytes] = set()
_log_probes = False  # --log-probes: print every request that is not a completion


def _wants_stream(body: bytes) -> bool:
    """True when the JSON request body asks for ``"stream": true``."""
    if b'"stream"' not in body:
        return False
    try:
        return bool(json.loads(body).get("stream"))
    except (ValueError, AttributeError):
        return False


_completions = 0  # completion requests answered; exported on /metrics


def _answer(method: bytes, path: bytes, body: bytes, close: bool) -> bytes:
    """The full response for one parsed request."""
    global _completions
    idx = 1 if close else 0
    q = path.find(b"?")
    if q >= 0:
        path = path[:q]
    if method == b"POST":
        if path == b"/v1/chat/completions":
            _completions += 1
            return (_CHAT_SSE if _wants_stream(body) else _CHAT)[idx]
        if path == b"/v1/completions":
            _completions += 1
            return (_COMPL_SSE if _wants_stream(body) else _COMPL)[idx]
    if path == b"/metrics" and method in (b"GET", b"HEAD"):
        body = _METRICS_HEAD + str(_completions).encode() + b"\n"
        return _response(_OK, b"text/plain; version=0.0.4", body, close)
    if _log_probes:
        print(f"fast_backend: {method.decode()} {path.decode()}", file=sys.stderr, flush=True)
    hit = _STATIC.get((method, path))
    if hit is not None:
        return hit[idx]
    if path not in _seen_unknown:
        _seen_unknown.add(path)
        print(f"fast_backend: 404 for {method.decode()} {path.decode()}", file=sys.stderr)
    return _NOT_FOUND[idx]


class HTTPProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; bodies by ``Content-Length`` or chunked."""

    __slots__ = ("buf", "transport")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        close = False
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(buf[:end])
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                out.append(_BAD)
                close = True
                break
            method, path, version = parts
            if not version.startswith(b"HTTP/1."):
                # e.g. an HTTP/2 prior-knowledge preface ("PRI * HTTP/2.0"): HTTP/1.1 only here.
                out.append(_VERSION)
                close = True
                break
            length = 0
            chunked = False
            close = version == b"HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    v = value.strip().lower()
                    if v == b"close":
                        close = True
                    elif v == b"keep-alive":
                        close = False
            start = end + 4
            if chunked:
                decoded = _dechunk(buf, start)
                if decoded is None:
                    break  # wait for the rest of the body
                body, consumed = decoded
                del buf[:consumed]
            else:
                if len(buf) - start < length:
                    break  # wait for the rest of the body
                body = bytes(buf[start : start + length])
                del buf[: start + length]
            out.append(_answer(method, path, body, close))
            if close:
                break
        if out and self.transport is not None:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
            if close:
                self.transport.close()


def _dechunk(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at ``start``; ``(body, end offset)`` or None if partial."""
    pos = start
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0].strip() or b"0", 16)
        pos = eol + 2
        if size == 0:
            # Skip trailers up to the empty line.
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return bytes(body), eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos : pos + size]
        pos += size + 2


async def serve(host: str, port: int, reuse_port: bool = False) -> None:
    """Serve until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        HTTPProtocol, host, port, backlog=4096, reuse_port=reuse_port or None
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fast_backend: listening on http://{host}:{port}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description="Fast OpenAI-compatible test backend: fixed answers, no model.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port to bind (default 8001)")
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="set SO_REUSEPORT so several processes can share the port",
    )
    parser.add_argument(
        "--no-uvloop",
        action="store_true",
        help="use the default asyncio loop even if uvloop is installed",
    )
    parser.add_argument(
        "--log-probes",
        action="store_true",
        help="print every request other than a completion (to see what a router probes)",
    )
    args = parser.parse_args(argv)
    global _log_probes
    _log_probes = args.log_probes
    coro = serve(args.host, args.port, args.reuse_port)
    try:
        if not args.no_uvloop:
            try:
                import uvloop
            except ImportError:
                pass
            else:
                uvloop.run(coro)
                return
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
