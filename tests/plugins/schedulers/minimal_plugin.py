"""A scheduler plugin written as a third party would: :class:`BaseScheduler` and only the queue
methods it requires (no ``start``, ``stop`` or ``health``).

It refuses a request whose id reads ``refuse-<kind>-...`` with that :class:`RejectionKind`, so
a test can see how an engine answers each kind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import fdcore
from fdcore.bases import BaseScheduler
from fdcore.outbox import Outbox
from fdcore.registry import Register
from fdcore.tasks import wait_event
from fdcore.types import (
    Capacity,
    EmptyConfig,
    EngineRequest,
    Rejection,
    RejectionKind,
    RequestOutput,
    SchedulerContext,
)


class Minimal(BaseScheduler[EmptyConfig]):
    """An in-process FIFO."""

    name = "minimal"

    def __init__(self, config: EmptyConfig, context: SchedulerContext) -> None:
        super().__init__(config, context)
        self.queue: list[EngineRequest] = []
        self.outbox = Outbox()
        self.queued = asyncio.Event()

    async def put_requests(self, requests: Sequence[EngineRequest]) -> list[Rejection]:
        """Queue all but those whose id asks to be refused."""
        refused = []
        for request in requests:
            prefix, _, rest = request.request_id.partition("-")
            if prefix == "refuse":
                kind = RejectionKind(rest.partition("-")[0])
                refused.append(Rejection(request.request_id, kind, f"refused as {kind}"))
            else:
                self.queue.append(request)
        self.queued.set()
        return refused

    async def get_requests(self, capacity: Capacity, timeout: float = 0.0) -> list[EngineRequest]:
        """The queue's head, as much as fits."""
        if not self.queue and timeout > 0:
            self.queued.clear()
            await wait_event(self.queued, timeout)
        taken = self.queue[: capacity.admissible(self.queue)]
        del self.queue[: len(taken)]
        return taken

    async def put_results(self, results: Sequence[RequestOutput]) -> None:
        """Keep outputs until the API side drains them."""
        for output in results:
            self.outbox.add(output)

    async def get_results(self, timeout: float = 0.0) -> dict[str, list[RequestOutput]]:
        """Everything since the last call."""
        return await self.outbox.drain(timeout)

    async def abort(self, request_ids: Sequence[str]) -> None:
        """Dequeue and drop these."""
        self.queue = [r for r in self.queue if r.request_id not in request_ids]
        for rid in request_ids:
            self.outbox.drop(rid)

    async def get_unhandled_request_num(self) -> int:
        """Requests still queued."""
        return len(self.queue)


@fdcore.hookimpl
def fdcore_register_schedulers(register: Register) -> None:
    """Register ``minimal``."""
    register.add_scheduler(Minimal)
