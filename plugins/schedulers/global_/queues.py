"""Redis operations on instances' queues: enqueue, take (own or stolen), deliver, reset."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

from fdcore.redis import RedisLink
from fdcore.types import Capacity

from .config import GlobalConfig
from .keys import Topic
from .scripts import Scripts
from .wire import Queued


class Queues:
    """The queues of every instance of one topic, as seen from instance ``name``."""

    def __init__(self, link: RedisLink, config: GlobalConfig, name: str) -> None:
        self.link = link
        self.config = config
        self.name = name
        self.topic = Topic(config.topic, config.load_shards_num)
        self.keys = self.topic.instance(name)
        self.scripts = Scripts(link.client)
        self.ttl = math.ceil(config.ttl)

    async def enqueue(self, items: Sequence[Queued]) -> int:
        """Append to this instance's queue; returns its new length."""
        keys = self.keys
        args: list[bytes | str | int] = [
            self.name, self.ttl, self.config.min_load_score, self.topic.loaded_channel,
            *(item.encode() for item in items),
        ]
        return int(await self.scripts.enqueue(keys=[keys.requests, keys.load], args=args))

    async def take(self, owner: str, capacity: Capacity) -> tuple[bool, list[Queued]]:
        """Pop what fits ``capacity`` from ``owner``'s queue (a steal unless ``owner`` is this
        instance).

        Returns ``(owner_alive, items)``; items of a dead owner are handed over only so they
        can be dropped.
        """
        keys = self.topic.instance(owner)
        thief = "" if owner == self.name else self.name
        reply = await self.scripts.take(
            keys=[keys.requests, keys.load, keys.alive, keys.results],
            args=[owner, capacity.batch, capacity.available_blocks, capacity.block_size,
                  capacity.reserved_output_blocks, self.config.min_load_score, thief, self.ttl,
                  self.topic.loaded_channel],
        )
        return bool(reply[0]), [Queued.decode(raw) for raw in reply[1:]]

    async def deliver(self, origin: str, messages: Sequence[bytes]) -> bool:
        """Send messages to ``origin``'s results list; False when the origin is gone."""
        keys = self.topic.instance(origin)
        reply = await self.scripts.deliver(
            keys=[keys.results, keys.alive], args=[self.ttl, *messages]
        )
        return bool(reply)

    async def loaded(self, shard: int, limit: int = 50) -> list[tuple[str, int]]:
        """Other instances of a shard with queued work, most loaded first."""
        members = await self.link.client.zrevrangebyscore(
            self.topic.load(shard), "+inf", 1, start=0, num=limit, withscores=True
        )
        named = [(member.decode(), int(score))
                 for member, score in cast(list[tuple[bytes, float]], members)]
        return [(member, score) for member, score in named if member != self.name]

    async def reset(self) -> None:
        """Forget a previous run under this name: its clients are gone."""
        keys = self.keys
        async with self.link.client.pipeline(transaction=True) as pipe:
            pipe.delete(keys.requests, keys.results)
            pipe.zrem(keys.load, self.name)
            await pipe.execute()

    async def alive(self, names: Sequence[str]) -> dict[str, bool]:
        """Whether each instance's liveness key exists."""
        async with self.link.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(self.topic.instance(name).alive)
            found = await pipe.execute()
        return {name: bool(hit) for name, hit in zip(names, found, strict=True)}
