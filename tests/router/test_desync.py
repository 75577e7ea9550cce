"""No answer ever reaches the wrong client: hostile request ids and header values through a real
router, checked by clients that each verify the answer they got is their own."""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import aiohttp
import orjson
import pytest

from tests.router.conftest import Router, RouterFactory

CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}

# A body id that, written raw into the upstream head, ends the request early and smuggles a
# second one onto the pooled connection: its answer would then go to the next client.
SMUGGLE = (
    "evil\r\ncontent-length: 2\r\n\r\n{}"
    "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: stolen\r\n"
    "content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
)
HOSTILE_IDS = [
    SMUGGLE,
    "line\nfeed",
    "carriage\rreturn",
    "nul\x00byte",
    "bell\x07",
    "tab\tid",
    "del\x7f",
    "caf\u00e9",  # latin-1, not ASCII
    "\u4e2d\u6587",  # not latin-1 at all
    "space id",
    "x" * 257,
    "",
]


async def _ask(session: aiohttp.ClientSession, url: str, rid: str, stream: bool) -> str:
    """One request with id ``rid``; returns the id the answer carries."""
    body = {**CHAT, "stream": stream}
    async with session.post(f"{url}/v1/chat/completions", json=body,
                            headers={"x-request-id": rid}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["x-request-id"] == rid
        if not stream:
            return str((await resp.json())["id"])
        ids = set()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                ids.add(orjson.loads(line[6:])["id"])
        assert len(ids) == 1, ids
        return str(ids.pop())


async def _hostile(session: aiohttp.ClientSession, url: str, rid: str) -> None:
    """A request with a hostile body id: a clear 400 with a JSON body, never a 5xx."""
    async with session.post(f"{url}/v1/chat/completions",
                            json={**CHAT, "request_id": rid}) as resp:
        assert resp.status == 400, (rid, resp.status, await resp.text())
        body = await resp.json()
        assert "request_id" in body["error"]["message"]


@pytest.fixture
def served(backends: Any, router: RouterFactory) -> Router:
    (backend,) = backends(1)
    return router([backend])


async def test_smuggling_body_id_cannot_steal_later_answers(served: Router) -> None:
    await served.wait_healthy(1)
    # One connection to the router, so the router reuses one upstream connection too.
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _hostile(session, served.url, SMUGGLE)
        for n in range(20):
            rid = f"own-{n}"
            assert await _ask(session, served.url, rid, stream=bool(n % 2)) == rid


async def test_hostile_ids_get_400_on_header_and_body(served: Router) -> None:
    await served.wait_healthy(1)
    async with aiohttp.ClientSession() as session:
        for rid in HOSTILE_IDS:
            if rid:
                await _hostile(session, served.url, rid)
        # Header ids the HTTP client lets through (it refuses control characters itself; the
        # raw-socket test sends those).
        for rid in ["space id", "x" * 257, "semi;colon id"]:
            async with session.post(f"{served.url}/v1/chat/completions", json=CHAT,
                                    headers={"x-request-id": rid}) as resp:
                assert resp.status == 400, (rid, resp.status)
                assert "x-request-id" in (await resp.json())["error"]["message"]
        assert await _ask(session, served.url, "after-all-that", stream=False) == "after-all-that"


async def _raw(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


async def test_raw_header_bytes_never_reach_upstream(served: Router) -> None:
    """Header values with bytes an HTTP client would not send: 400 (or the server's own
    refusal), never a 5xx, and the router keeps answering everyone correctly."""
    await served.wait_healthy(1)
    body = orjson.dumps(CHAT)
    for value in [b"a\x00b", b"a\x01b", b"a\x7fb", b"tab\tid", b"\xff\xfe", b"caf\xc3\xa9"]:
        for name in [b"x-request-id", b"x-custom"]:
            head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\n"
                    b"content-type: application/json\r\n" + name + b": " + value +
                    b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            answer = await _raw(served.port, head)
            status = int(answer.split(b" ", 2)[1])
            assert 200 <= status < 500, answer[:200]
            if name == b"x-request-id":
                assert status == 400, answer[:200]
    async with aiohttp.ClientSession() as session:
        assert await _ask(session, served.url, "still-mine", stream=True) == "still-mine"


async def test_many_clients_with_hostile_ids_each_get_their_own_answer(
    backends: Any, router: RouterFactory
) -> None:
    pair = backends(2)
    r = router(pair)
    await r.wait_healthy(2)
    rng = random.Random(7)
    counter = itertools.count()
    wrong: list[tuple[str, str]] = []

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in range(15):
            if rng.random() < 0.3:
                await _hostile(session, r.url, rng.choice(HOSTILE_IDS[:-1]))
                continue
            rid = f"c{next(counter)}"
            got = await _ask(session, r.url, rid, stream=rng.random() < 0.5)
            if got != rid:
                wrong.append((rid, got))

    connector = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(24)))
    assert wrong == []
