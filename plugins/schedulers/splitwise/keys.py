"""Redis key names of the ``splitwise`` scheduler.

Every command touches one key, so the keys need no common hash tag and spread over a Redis
Cluster's slots: ``{topic}.cluster`` (one hash, a field per instance), and per instance its
request queue and its ``reader-parallel`` output streams.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names of one topic."""

    topic: str

    @property
    def cluster(self) -> str:
        """Hash: instance name -> its JSON card (role, load, host, transfer info, ``ts``)."""
        return f"{self.topic}.cluster"

    def queue(self, name: str) -> str:
        """List of work queued for instance ``name`` to run (and abort notes)."""
        return f"{self.topic}.req.{name}"

    def outputs(self, name: str, reader: int) -> str:
        """Stream of outputs (and claims) for the clients of instance ``name``."""
        return f"{self.topic}.out.{name}.{reader}"
