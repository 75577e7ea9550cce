"""Redis key names of the ``global`` scheduler and the shard an instance belongs to.

Every key of one instance carries the hash tag of its load shard (``{topic.shard}``), so the
instance's queues, its liveness key and its shard's load table sit in one Redis Cluster slot:
the Lua scripts that touch several of them stay single-slot, and ``load-shards-num`` is also
the number of slots (so of cluster nodes, at most) a topic spreads over.
"""

from __future__ import annotations

from dataclasses import dataclass


def crc16_ccitt_false(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF): FastDeploy's shard hash."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        crc &= 0xFFFF
    return crc


def shard_of(name: str, shards: int) -> int:
    """The load shard of instance ``name`` among ``shards``."""
    return crc16_ccitt_false(name.encode()) % shards


@dataclass(frozen=True, slots=True)
class InstanceKeys:
    """The keys of one instance (its requests, results, liveness) and of its load table."""

    name: str
    tag: str

    @property
    def requests(self) -> str:
        """List of queued requests whose clients wait on this instance."""
        return f"{self.tag}.req.{self.name}"

    @property
    def results(self) -> str:
        """List of outputs (and claims) other instances send back to this instance."""
        return f"{self.tag}.resp.{self.name}"

    @property
    def alive(self) -> str:
        """Liveness key, renewed while the instance runs."""
        return f"{self.tag}.ins.{self.name}"

    @property
    def load(self) -> str:
        """The load table (sorted set: instance -> queued requests) of the shard."""
        return f"{self.tag}.load"


@dataclass(frozen=True, slots=True)
class Topic:
    """Names every key of one topic split into ``shards`` load tables."""

    topic: str
    shards: int

    def tag(self, shard: int) -> str:
        """Hash tag of one shard."""
        return "{" + f"{self.topic}.{shard}" + "}"

    def instance(self, name: str) -> InstanceKeys:
        """Keys of instance ``name``."""
        return InstanceKeys(name, self.tag(shard_of(name, self.shards)))

    def load(self, shard: int) -> str:
        """Load table of one shard."""
        return f"{self.tag(shard)}.load"

    @property
    def loaded_channel(self) -> str:
        """Pub/sub channel on which an instance with stealable work announces itself."""
        return f"{self.topic}.loaded"
