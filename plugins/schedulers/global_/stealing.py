"""Which instance to steal from: the most loaded ones of a shard, shards in turn."""

from __future__ import annotations

import random

from fdcore.types import Capacity

from .queues import Queues
from .wire import Queued

# FastDeploy probes at most this many load tables per attempt.
_SHARDS_PER_ATTEMPT = 5
# Loaded victims tried per shard before giving up on it.
_VICTIMS_PER_SHARD = 3


class Thief:
    """Finds queued work of other instances that this idle instance may take."""

    def __init__(self, queues: Queues) -> None:
        self.queues = queues
        self.shards = queues.config.load_shards_num
        self.min_load = queues.config.min_load_score
        self._cursor = random.randrange(self.shards)

    async def steal(self, capacity: Capacity) -> tuple[str, bool, list[Queued]]:
        """Take work that fits ``capacity`` from one other instance: ``(victim, victim_alive,
        items)``.

        Instances with at least ``min-load-score`` queued requests are tried, most loaded
        first. When a shard has none, one instance with a shorter queue is tried: if it is
        dead its work is handed over (to be dropped), which is how dead queues get drained.
        """
        for _ in range(min(_SHARDS_PER_ATTEMPT, self.shards)):
            shard = self._cursor % self.shards
            self._cursor += 1
            members = await self.queues.loaded(shard)
            loaded = [name for name, score in members if score >= self.min_load]
            victims = loaded[:_VICTIMS_PER_SHARD] or [name for name, _ in members[-1:]]
            for victim in victims:
                alive, items = await self.queues.take(victim, capacity)
                if items:
                    return victim, alive, items
        return "", True, []
