"""Start-up checks of the ``splitwise`` scheduler: Redis too old, Redis unreachable."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from fdcore_plugins.schedulers.splitwise import SplitwiseScheduler
from fdcore_plugins.schedulers.splitwise.config import SplitwiseConfig

from fdcore.errors import StartupError
from fdcore.testing import free_port
from fdcore.types import SchedulerContext


async def _old_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Speaks just enough RESP to claim to be Redis 6.0.9."""
    with contextlib.closing(writer), \
            contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            header = await reader.readline()
            if not header:
                return
            words = []
            for _ in range(int(header[1:])):
                await reader.readline()  # $len
                words.append((await reader.readline()).strip().decode().upper())
            if words and words[0] == "INFO":
                info = b"# Server\r\nredis_version:6.0.9\r\n"
                writer.write(b"$%d\r\n%s\r\n" % (len(info), info))
            else:
                writer.write(b"+OK\r\n")
            await writer.drain()


def _scheduler(port: int) -> SplitwiseScheduler:
    return SplitwiseScheduler(SplitwiseConfig(port=port),
                              SchedulerContext("127.0.0.1:1", "127.0.0.1", 1, 16))


async def test_redis_older_than_6_2_is_refused() -> None:
    server = await asyncio.start_server(_old_redis, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    scheduler = _scheduler(port)
    try:
        with pytest.raises(StartupError, match=r"is 6\.0\.9; it needs 6\.2 or newer"):
            await scheduler.start()
    finally:
        await scheduler.link.close()
        server.close()
        await server.wait_closed()


async def test_unreachable_redis_is_one_line() -> None:
    scheduler = _scheduler(free_port())
    try:
        with pytest.raises(StartupError, match="scheduler 'splitwise': cannot reach Redis"):
            await scheduler.start()
    finally:
        await scheduler.link.close()
