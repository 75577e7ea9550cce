"""The router's upstream client against instances that break HTTP framing: every answer it
hands out belongs to the request that was sent, and a connection in doubt is never reused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from fdcore.router.upstream import ResponseFailed, UpstreamPool
from fdcore.testing.cluster import wait_until

HEAD = b"POST /v1/completions HTTP/1.1\r\n"


def _response(rid: bytes, echo: bytes | None = None) -> bytes:
    body = b'{"id": "' + rid + b'"}'
    echo_header = b"x-request-id: " + (rid if echo is None else echo) + b"\r\n"
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + echo_header +
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request from the stream; returns its x-request-id."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    rid, length = b"", 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b": ")
        if name.lower() == b"x-request-id":
            rid = value
        elif name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return rid


class Rogue:
    """A loopback instance whose answers are written by ``answer(rid, n) -> bytes``."""

    def __init__(self, answer: Callable[[bytes, int], bytes]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.connections += 1
        self.writers.append(writer)
        while (rid := await _read_request(reader)) is not None:
            self.requests += 1
            writer.write(self.answer(rid, self.requests))
            await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def serving(rogue: Rogue) -> AsyncIterator[tuple[UpstreamPool, int]]:
    server = await asyncio.start_server(rogue.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(connect_timeout=5)
    try:
        yield pool, port
    finally:
        pool.close()  # each handler then reads EOF and returns
        server.close()
        if rogue.handlers:
            await asyncio.wait(rogue.handlers, timeout=10)


async def _ask(pool: UpstreamPool, port: int, rid: bytes) -> bytes:
    head = HEAD + b"x-request-id: " + rid + b"\r\n"
    response = await pool.request("127.0.0.1", port, head, b"{}", rid)
    body = await response.read()
    response.release()
    return body


async def test_well_behaved_instance_reuses_one_connection() -> None:
    rogue = Rogue(lambda rid, n: _response(rid))
    async with serving(rogue) as (pool, port):
        for n in range(5):
            assert await _ask(pool, port, b"r%d" % n) == b'{"id": "r%d"}' % n
    assert rogue.connections == 1


async def test_two_responses_to_one_request_close_the_connection() -> None:
    # Each request gets its answer plus one that belongs to nobody (a smuggled request's).
    rogue = Rogue(lambda rid, n: _response(rid) + _response(b"stolen"))
    async with serving(rogue) as (pool, port):
        for n in range(5):
            assert await _ask(pool, port, b"r%d" % n) == b'{"id": "r%d"}' % n
    assert rogue.connections == 5  # none was reused


async def test_bytes_on_an_idle_connection_close_it() -> None:
    rogue = Rogue(lambda rid, n: _response(rid))
    async with serving(rogue) as (pool, port):
        assert await _ask(pool, port, b"first") == b'{"id": "first"}'
        (idle,) = pool._idle[("127.0.0.1", port)]
        # An answer nobody asked for arrives while the connection sits in the pool.
        rogue.writers[0].write(_response(b"stolen"))

        async def closed() -> bool:
            return idle.closed

        await wait_until(closed, timeout=10)
        assert await _ask(pool, port, b"second") == b'{"id": "second"}'
    assert rogue.connections == 2


async def test_a_response_naming_another_request_is_refused() -> None:
    rogue = Rogue(lambda rid, n: _response(rid, echo=b"someone-else") if n == 1 else
                  _response(rid))
    async with serving(rogue) as (pool, port):
        with pytest.raises(ResponseFailed, match="someone-else"):
            await _ask(pool, port, b"mine")
        assert await _ask(pool, port, b"next") == b'{"id": "next"}'
    assert rogue.connections == 2


async def test_a_late_answer_to_a_smuggled_request_is_refused() -> None:
    """The desync as it happens on a slow instance: the stray answer arrives after the next
    request was written, so only the id check can tell it is not that request's answer."""
    stray_sent = asyncio.Event()
    rogue_writes: list[bytes] = []

    def answer(rid: bytes, n: int) -> bytes:
        if n != 2:
            return _response(rid)
        # The second request on this connection first gets the stray answer.
        rogue_writes.append(rid)
        stray_sent.set()
        return _response(b"smuggled") + _response(rid)

    rogue = Rogue(answer)
    async with serving(rogue) as (pool, port):
        assert await _ask(pool, port, b"one") == b'{"id": "one"}'
        with pytest.raises(ResponseFailed, match="smuggled"):
            await _ask(pool, port, b"two")
        assert stray_sent.is_set()
        assert await _ask(pool, port, b"three") == b'{"id": "three"}'
