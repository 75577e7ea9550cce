"""Loops that listen to Redis: this origin's results list, and announcements of stealable work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from redis.exceptions import RedisError

from fdcore.redis import Backoff, RedisLink, pop_batch, until_done

# A blocking read returns after this long with nothing, to notice it is no longer needed.
_BLOCK_SECONDS = 1.0
# Messages read in one go after the first one arrives.
_BATCH = 256


class Inbox:
    """Reads the results list while ``wanted()`` (some own request is not running here)."""

    def __init__(
        self,
        link: RedisLink,
        key: str,
        wanted: Callable[[], bool],
        on_messages: Callable[[list[bytes]], None],
        on_error: Callable[[], None],
    ) -> None:
        self.link = link
        self.key = key
        self.wanted = wanted
        self.on_messages = on_messages
        self.on_error = on_error
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Something may be sent here soon (a request was queued)."""
        self._wake.set()

    async def run(self) -> None:
        """Read forever."""
        backoff = Backoff()
        while True:
            if not self.wanted():
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = await until_done(
                self.link, backoff,
                lambda: pop_batch(self.link, self.key, _BATCH, _BLOCK_SECONDS), self.on_error)
            if batch:
                self.on_messages(batch)


class Announcements:
    """Subscribes to the channel on which instances with stealable work announce themselves."""

    def __init__(
        self, link: RedisLink, channel: str, name: str, on_wake: Callable[[], None]
    ) -> None:
        self.link = link
        self.channel = channel
        self.name = name.encode()
        self.on_wake = on_wake

    async def run(self) -> None:
        """Listen forever, subscribing again after a failure."""
        backoff = Backoff()
        while True:
            pubsub = self.link.blocking.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                backoff.reset()
                self.on_wake()  # announcements made while unsubscribed are lost
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message["data"] != self.name:
                        self.on_wake()
            except RedisError as exc:
                self.link.down(exc)
                await backoff.wait()
            finally:
                await pubsub.aclose()
