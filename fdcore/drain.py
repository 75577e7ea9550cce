"""Graceful drain: the state a server shares with what it serves while it stops.

The server drives it (``fdcore/server.py``): on SIGTERM it calls :meth:`Drain.begin`, stops
accepting connections and waits for in-flight requests; when they are done or the grace period
ends it calls :meth:`Drain.expire`. What it serves reads it: ``/health`` answers 503 ``draining``
once :attr:`Drain.draining` is true, and the proxy (the engine: its serving layer) ends what is
still running, with an error event, when :attr:`Drain.expired` is set.
"""

from __future__ import annotations

import asyncio


class Drain:
    """Whether a drain has begun, and an event set when its grace period is over.

    States, in order: serving (``draining`` false), draining (``draining`` true, ``expired``
    clear: in-flight requests may finish), expired (both set: end what remains now).
    """

    def __init__(self) -> None:
        self.draining = False
        self.expired = asyncio.Event()

    def begin(self) -> None:
        """Enter the draining state (the server has stopped accepting connections)."""
        self.draining = True

    def expire(self) -> None:
        """End the grace period: whatever is still in flight must end now."""
        self.draining = True
        self.expired.set()
