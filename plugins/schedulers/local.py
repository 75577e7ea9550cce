"""``local``: an in-process FIFO between the engine's API server and its batcher.

Follows FastDeploy's LocalScheduler: ``max-size`` caps the requests in flight (queued or
running; -1 for no cap) and a full scheduler rejects a whole ``put_requests`` call; a request
id already in flight is rejected as duplicated. Unlike FastDeploy, ``ttl`` eviction of queued
requests always runs (not only above ``max-size``) and the evicted client gets an error.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence

from pydantic import Field

import fdcore
from fdcore.bases import BaseScheduler
from fdcore.outbox import Outbox
from fdcore.registry import Register
from fdcore.tasks import cancel_and_wait, wait_event
from fdcore.types import (
    Capacity,
    EngineRequest,
    Rejection,
    RejectionKind,
    RequestOutput,
    SchedulerContext,
    StrictModel,
)


class LocalConfig(StrictModel):
    """``--scheduler-max-size`` and ``--scheduler-ttl``."""

    max_size: int = Field(-1, ge=-1, description="requests in flight at most; -1: no limit")
    ttl: float = Field(900.0, gt=0, description="seconds a request may wait in the queue")


class LocalScheduler(BaseScheduler[LocalConfig]):
    """Queues requests in this process and hands results straight back to the API side."""

    name = "local"
    Config = LocalConfig

    def __init__(self, config: LocalConfig, context: SchedulerContext) -> None:
        super().__init__(config, context)
        self._queue: OrderedDict[str, tuple[EngineRequest, float]] = OrderedDict()
        self._in_flight: set[str] = set()
        self._outbox = Outbox()
        self._queued = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the ttl reaper."""
        self._reaper = asyncio.create_task(self._reap(), name="local-scheduler-ttl")

    async def stop(self) -> None:
        """Stop the ttl reaper."""
        await cancel_and_wait(self._reaper)

    async def put_requests(self, requests: Sequence[EngineRequest]) -> list[Rejection]:
        """Enqueue; a full scheduler rejects them all, a duplicate id is rejected alone."""
        max_size = self.config.max_size
        if max_size > 0 and len(self._in_flight) + len(requests) > max_size:
            message = f"Exceeding the max length of the local scheduler (max_size={max_size})"
            return [Rejection(r.request_id, RejectionKind.QUEUE_FULL, message) for r in requests]
        rejected: list[Rejection] = []
        now = time.monotonic()
        for request in requests:
            rid = request.request_id
            if rid in self._in_flight:
                rejected.append(
                    Rejection(rid, RejectionKind.DUPLICATE_ID, f"duplicated request_id: {rid}")
                )
                continue
            self._in_flight.add(rid)
            self._queue[rid] = (request, now)
        self._queued.set()
        return rejected

    async def get_requests(self, capacity: Capacity, timeout: float = 0.0) -> list[EngineRequest]:
        """Take the queue's head while it fits (FastDeploy's admission rule)."""
        if not self._queue and timeout > 0:
            self._queued.clear()
            await wait_event(self._queued, timeout)
        head = [request for request, _ in list(self._queue.values())[: capacity.batch]]
        taken = head[: capacity.admissible(head)]
        for request in taken:
            del self._queue[request.request_id]
        return taken

    async def put_results(self, results: Sequence[RequestOutput]) -> None:
        """Keep outputs of requests still in flight; a finished one leaves the scheduler."""
        for output in results:
            if output.request_id not in self._in_flight:
                continue  # aborted or expired meanwhile
            self._outbox.add(output)
            if output.finished:
                self._in_flight.discard(output.request_id)

    async def get_results(self, timeout: float = 0.0) -> dict[str, list[RequestOutput]]:
        """Everything produced since the last call, waiting up to ``timeout`` for something."""
        return await self._outbox.drain(timeout)

    async def abort(self, request_ids: Sequence[str]) -> None:
        """Forget these requests: dequeue them and drop their pending and future outputs."""
        for rid in request_ids:
            self._queue.pop(rid, None)
            self._outbox.drop(rid)
            self._in_flight.discard(rid)

    async def get_unhandled_request_num(self) -> int:
        """Requests queued and not yet taken by the engine."""
        return len(self._queue)

    async def _reap(self) -> None:
        ttl = self.config.ttl
        while True:
            if not self._queue:
                self._queued.clear()
                await self._queued.wait()
                continue
            _, oldest = next(iter(self._queue.values()))
            delay = oldest + ttl - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            deadline = time.monotonic() - ttl
            expired = [rid for rid, (_, at) in self._queue.items() if at <= deadline]
            await self.put_results([self._expired(rid) for rid in expired])
            for rid in expired:
                del self._queue[rid]

    def _expired(self, request_id: str) -> RequestOutput:
        return RequestOutput(
            request_id=request_id,
            token_ids=[],
            finished=True,
            finish_reason="error",
            error=(
                f"request {request_id} waited in the local scheduler queue longer than its "
                f"ttl ({self.config.ttl:g} s) and was dropped"
            ),
            error_code=503,
        )


@fdcore.hookimpl
def fdcore_register_schedulers(register: Register) -> None:
    """Register ``local``."""
    register.add_scheduler(LocalScheduler)
