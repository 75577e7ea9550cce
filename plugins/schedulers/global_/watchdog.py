"""Fails own requests that can no longer finish, so no client waits forever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from .config import GlobalConfig
from .ledger import Ledger, Own
from .queues import Queues

_TICK_SECONDS = 1.0


class Watchdog:
    """Once a second, fails own requests that are not running here and:

    * waited in the queue longer than ``ttl``;
    * were queued or running elsewhere when Redis became unreachable, and it stays so for
      ``lost-timeout`` seconds;
    * were queued or running elsewhere when Redis lost its data (a restart) and show no sign
      of life within ``lost-timeout`` seconds (requests that were stolen before it keep
      sending outputs and are unaffected);
    * run on an instance whose liveness key has expired. A key found missing within
      ``alive-ttl`` of Redis coming back (or losing its data) proves nothing: a live instance
      renews its key every third of that, so the check waits until each had the time.
    """

    def __init__(
        self, ledger: Ledger, queues: Queues, config: GlobalConfig,
        fail: Callable[[Own, str], None],
    ) -> None:
        self.ledger = ledger
        self.queues = queues
        self.config = config
        self.fail = fail
        self.lost_at: float | None = None
        self.unsettled_at = time.monotonic()  # Redis last seen down or without its data

    def data_lost(self) -> None:
        """Redis came back without this instance's keys."""
        self.lost_at = self.lost_at or time.monotonic()
        self.unsettled_at = time.monotonic()

    async def run(self) -> None:
        """Check forever."""
        checked_executors = time.monotonic()
        while True:
            await asyncio.sleep(_TICK_SECONDS)
            now = time.monotonic()
            if self.queues.link.down_since is not None:
                self.unsettled_at = now
            self._expire()
            self._lost(now)
            settled = now - self.unsettled_at >= self.config.alive_ttl
            if settled and now - checked_executors >= self.config.alive_ttl / 3:
                checked_executors = now
                await self._executors()

    def _expire(self) -> None:
        deadline = time.time() - self.config.ttl
        for own in self.ledger.away():
            if not own.executor and own.queued.queued_at <= deadline:
                self.fail(own, f"waited in the global scheduler queue longer than its ttl "
                               f"({self.config.ttl:g} s) and was dropped")

    def _lost(self, now: float) -> None:
        timeout, address = self.config.lost_timeout, self.queues.link.address
        down_since = self.queues.link.down_since
        if down_since is not None and now - down_since >= timeout:
            self._fail_heard_before(down_since, f"Redis at {address} has been unreachable "
                                                f"for {timeout:g} s")
        if self.lost_at is not None and now - self.lost_at >= timeout:
            self._fail_heard_before(self.lost_at, f"Redis at {address} restarted or lost its "
                                                  "data while the request was queued in it")
            self.lost_at = None

    def _fail_heard_before(self, since: float, message: str) -> None:
        for own in self.ledger.away():
            if own.heard_at < since:
                self.fail(own, message)

    async def _executors(self) -> None:
        running = {own.executor: own for own in self.ledger.away() if own.executor}
        if not running:
            return
        try:
            alive = await self.queues.alive(sorted(running))
        except RedisError as exc:
            self.queues.link.down(exc)
            return
        for own in self.ledger.away():
            if own.executor and not alive[own.executor]:
                self.fail(own, f"instance {own.executor}, which was running it, stopped")
