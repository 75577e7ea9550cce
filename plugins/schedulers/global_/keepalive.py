"""The liveness key: renewed while the instance runs; its absence reveals a Redis that lost data."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import cast

import structlog

from fdcore.redis import Heartbeat, RedisLink

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
        self.on_data_lost = on_data_lost
        self.token = uuid.uuid4().hex  # tells this process from another one using the name
        self.heartbeat = Heartbeat(link, alive_ttl / 3, self._renew)

    @property
    def interval(self) -> float:
        """Seconds between renewals."""
        return self.heartbeat.interval

    def poke(self) -> None:
        """Another loop saw Redis fail: check again now rather than at the next renewal."""
        self.heartbeat.poke()

    async def register(self) -> None:
        """Set the key once at start-up (a previous run's key is simply replaced)."""
        await self.link.client.set(self.key, self.token, ex=self.expiry)

    async def run(self) -> None:
        """Renew forever."""
        await self.heartbeat.run()

    async def _renew(self) -> None:
        previous = await self.link.client.set(self.key, self.token, ex=self.expiry, get=True)
        if previous is None:
            log.warning("global_scheduler.redis_lost_data", key=self.key,
                        redis=self.link.address)
            self.on_data_lost()
        elif cast(bytes, previous).decode() != self.token:
            log.error("global_scheduler.name_in_use", key=self.key,
                      hint="another instance registered under the same host:port")
