"""The topic's cluster hash: each instance's card, kept fresh, and this instance's view of all.

An instance writes ``{"ts", "role", "load", "host", "disaggregated"}`` (FastDeploy's fields;
``disaggregated`` is the engine's register payload, so pairing reads the same card a router
reads) under its name. It checks its load every ``sync-period`` and writes when the load
changed, or every third of ``expire-period`` regardless, so a live instance is never older
than that. Readers ignore entries older than ``expire-period`` and delete those older than
``clear-expired-nodes-period``; the hash itself expires that long after its last write.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
import structlog

from fdcore.redis import Heartbeat, RedisLink
from fdcore.router.payload import PayloadError, parse_instance
from fdcore.types import Instance, Role

from .config import SplitwiseConfig
from .keys import Keys

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Node:
    """One instance as the cluster hash shows it."""

    name: str
    load: int
    ts: float  # wall clock of its last write
    instance: Instance  # its card, parsed as a router parses a register payload

    @property
    def role(self) -> Role:
        """prefill, decode or mixed."""
        return self.instance.role


class Cluster:
    """Publishes this instance's card and reads everyone's (cached for ``sync-period``)."""

    def __init__(
        self, link: RedisLink, keys: Keys, config: SplitwiseConfig, name: str,
        card: dict[str, Any], load: Callable[[], int],
    ) -> None:
        self.link = link
        self.keys = keys
        self.config = config
        self.name = name
        self.card = card
        self.load = load
        self.heartbeat = Heartbeat(link, config.sync_secs, self._beat)
        self._published: tuple[int, float] | None = None  # load, monotonic time written
        self._nodes: dict[str, Node] = {}
        self._read_at = -math.inf
        self._first_read_at: float | None = None
        self._seen: dict[str, float] = {}  # name -> monotonic time last seen fresh

    async def publish(self) -> None:
        """Write this instance's entry now."""
        load = self.load()
        entry = {"ts": time.time(), "role": self.card.get("role", "mixed"), "load": load,
                 "host": self.card.get("host_ip", ""), "disaggregated": self.card}
        async with self.link.client.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.cluster, self.name, orjson.dumps(entry))
            pipe.expire(self.keys.cluster, math.ceil(self.config.clear_expired_nodes_period))
            await pipe.execute()
        self._published = (load, time.monotonic())

    async def withdraw(self) -> None:
        """Remove this instance's entry (at stop)."""
        await self.link.client.hdel(self.keys.cluster, self.name)

    async def _beat(self) -> None:
        now = time.monotonic()
        if (self._published is None or self._published[0] != self.load()
                or now - self._published[1] >= self.config.expire_secs / 3):
            await self.publish()

    async def nodes(self) -> dict[str, Node]:
        """Live instances by name (read at most once per ``sync-period``; raises RedisError)."""
        now = time.monotonic()
        if now - self._read_at < self.config.sync_secs:
            return self._nodes
        raw = cast(dict[bytes, bytes], await self.link.client.hgetall(self.keys.cluster))
        self.link.up()
        wall = time.time()
        nodes: dict[str, Node] = {}
        stale: list[str] = []
        for field, value in raw.items():
            name = field.decode()
            node = _parse(name, value)
            if node is None or wall - node.ts > self.config.clear_expired_nodes_period:
                stale.append(name)
            elif wall - node.ts <= self.config.expire_secs:
                nodes[name] = node
                self._seen[name] = now
        if stale:
            await self.link.client.hdel(self.keys.cluster, *stale)
        self._nodes, self._read_at = nodes, now
        self._first_read_at = self._first_read_at or now
        return nodes

    def bump(self, name: str, load: int) -> None:
        """Count work just sent to ``name`` until its own next write says so."""
        node = self._nodes.get(name)
        if node is not None:
            node.load += load

    def gone(self, name: str) -> bool:
        """Whether ``name`` has not been seen fresh for ``expire-period`` (judged only from
        reads that succeeded; an instance never seen counts from this one's first read)."""
        if self._first_read_at is None:
            return False
        last = self._seen.get(name, self._first_read_at)
        return self._read_at - last > self.config.expire_secs


def _parse(name: str, value: bytes) -> Node | None:
    try:
        entry = orjson.loads(value)
        card = entry["disaggregated"]
        instance = parse_instance(card)
        return Node(name, int(entry["load"]), float(entry["ts"]), instance)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, PayloadError) as exc:
        log.warning("splitwise.bad_cluster_entry", instance=name, error=str(exc))
        return None
