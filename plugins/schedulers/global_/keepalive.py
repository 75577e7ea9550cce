"""The liveness key: renewed while the instance runs; its absence reveals a Redis that lost data."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable
from typing import cast

import structlog
from redis.exceptions import RedisError

from .link import Backoff, RedisLink
from .waiting import wait_event

log = structlog.get_logger(__name__)


class KeepAlive:
    """Renews ``key`` every third of ``alive_ttl``; retries soon while Redis is failing.

    The key is set with ``GET``: finding it missing means Redis restarted or lost the data
    (the key is renewed long before it could expire), and ``on_data_lost`` is called.
    """

    def __init__(
        self, link: RedisLink, key: str, alive_ttl: float, on_data_lost: Callable[[], None]
    ) -> None:
        self.link = link
        self.key = key
        self.expiry = math.ceil(alive_ttl)
        self.interval = alive_ttl / 3
        self.on_data_lost = on_data_lost
        self.token = uuid.uuid4().hex  # tells this process from another one using the name
        self._trouble = asyncio.Event()

    def poke(self) -> None:
        """Another loop saw Redis fail: check again now rather than at the next renewal."""
        self._trouble.set()

    async def register(self) -> None:
        """Set the key once at start-up (a previous run's key is simply replaced)."""
        await self.link.client.set(self.key, self.token, ex=self.expiry)

    async def run(self) -> None:
        """Renew forever."""
        backoff = Backoff()
        while True:
            try:
                previous = await self.link.client.set(
                    self.key, self.token, ex=self.expiry, get=True
                )
            except RedisError as exc:
                self.link.down(exc)
                await backoff.wait()
                continue
            self.link.up()
            backoff.reset()
            if previous is None:
                log.warning("global_scheduler.redis_lost_data", key=self.key,
                            redis=self.link.address)
                self.on_data_lost()
            elif cast(bytes, previous).decode() != self.token:
                log.error("global_scheduler.name_in_use", key=self.key,
                          hint="another instance registered under the same host:port")
            self._trouble.clear()
            await wait_event(self._trouble, self.interval)
