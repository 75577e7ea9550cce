"""``global``: instances share queues in Redis; an idle one steals work from a busy one.

Each instance queues its clients' requests in its own Redis list. Its engine takes from that
list first; an instance with nothing of its own takes from another whose queue holds at least
``min-load-score`` requests, runs them, and sends every step's outputs back to the origin,
which streams them to its client. See docs/schedulers.md for the rules and their reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any

import structlog
from redis.exceptions import RedisError

from fdcore.bases import BaseScheduler
from fdcore.errors import StartupError
from fdcore.outbox import Outbox
from fdcore.redis import RedisLink
from fdcore.tasks import cancel_stubborn, wait_event
from fdcore.types import (
    Capacity,
    EngineRequest,
    Rejection,
    RejectionKind,
    RequestOutput,
    SchedulerContext,
)

from .config import GlobalConfig
from .keepalive import KeepAlive
from .ledger import Ledger, Own, failure
from .listeners import Announcements, Inbox
from .queues import Queues
from .stealing import Thief
from .watchdog import Watchdog
from .wire import Claim, Queued, Result, decode_message

log = structlog.get_logger(__name__)


class GlobalScheduler(BaseScheduler[GlobalConfig]):
    """The ``global`` scheduler plugin (FastDeploy's GlobalScheduler, see the module doc)."""

    name = "global"
    Config = GlobalConfig

    def __init__(self, config: GlobalConfig, context: SchedulerContext) -> None:
        super().__init__(config, context)
        self.instance = context.instance_id
        self.link = RedisLink(config, f"scheduler {self.name!r}")
        self.queues = Queues(self.link, config, self.instance)
        self.thief = Thief(self.queues)
        self.ledger = Ledger(self.instance)
        self.keepalive = KeepAlive(
            self.link, self.queues.keys.alive, config.alive_ttl, self._data_lost
        )
        self.watchdog = Watchdog(self.ledger, self.queues, config, self._fail)
        self.inbox = Inbox(
            self.link, self.queues.keys.results, lambda: bool(self.ledger.away()),
            self._receive, self.keepalive.poke,
        )
        self.announcements = Announcements(
            self.link, self.queues.topic.loaded_channel, self.instance, self._steal_hint
        )
        # Requests taken from other instances, by the id this engine runs them under.
        self._stolen: dict[str, Queued] = {}
        self._outbox = Outbox()
        self._work = asyncio.Event()  # own work queued, or stealable work announced
        self._may_steal = True
        self._busy = True
        self._probed_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Check Redis, clear what a previous run under this name left, start the loops."""
        await self.link.check()
        try:
            await self.queues.reset()
            await self.keepalive.register()
        except RedisError as exc:
            raise StartupError(f"{self.link.owner}: Redis at {self.link.address}: {exc}") from None
        loops: list[Coroutine[Any, Any, None]] = [
            self.keepalive.run(), self.inbox.run(), self.announcements.run(), self.watchdog.run()
        ]
        self._tasks = [asyncio.create_task(loop, name="global-scheduler") for loop in loops]
        log.info("global_scheduler.started", instance=self.instance, redis=self.link.address,
                 requests=self.queues.keys.requests)

    async def stop(self) -> None:
        """Stop the loops; leave Redis as if this instance had never been there."""
        stuck = await cancel_stubborn(self._tasks)
        if stuck:
            log.warning("global_scheduler.stop_incomplete", tasks=stuck)
        with contextlib.suppress(RedisError):
            await self.queues.reset()
            await self.link.client.delete(self.queues.keys.alive)
        await self.link.close()

    def health(self) -> str | None:
        """None while Redis answers; otherwise why this instance cannot serve."""
        return self.link.health()

    async def put_requests(self, requests: Sequence[EngineRequest]) -> list[Rejection]:
        """Queue in this instance's Redis list; a duplicate id is rejected alone, and all are
        when Redis is unreachable."""
        rejected: list[Rejection] = []
        fresh: list[Queued] = []
        for request in requests:
            rid = request.request_id
            if rid in self.ledger or rid in self._stolen:
                rejected.append(
                    Rejection(rid, RejectionKind.DUPLICATE_ID, f"duplicate request_id: {rid}")
                )
                continue
            fresh.append(self.ledger.add(request))
        if not fresh:
            return rejected
        try:
            await self.queues.enqueue(fresh)
        except RedisError as exc:
            self._redis_failed(exc)
            for queued in fresh:
                self.ledger.forget(queued.request.request_id)
            message = f"the global scheduler cannot queue requests: {self.link.error}"
            return rejected + [
                Rejection(queued.request.request_id, RejectionKind.UNAVAILABLE, message)
                for queued in fresh
            ]
        self.link.up()
        self._work.set()
        self.inbox.wake()
        return rejected

    async def get_requests(self, capacity: Capacity, timeout: float = 0.0) -> list[EngineRequest]:
        """Own queued work first, else stolen work; wait up to ``timeout`` for either."""
        if capacity.empty:
            return []
        idle = timeout > 0
        now = time.monotonic()
        if idle and (self._busy or now - self._probed_at >= self.keepalive.interval):
            # Just ran out of work, or idle for a while (announcements can be missed, and a
            # dead instance's short queue is announced by nobody): look around.
            self._may_steal = True
        self._busy = not idle
        deadline = now + timeout
        while True:
            self._work.clear()
            requests = await self._take(capacity)
            left = deadline - time.monotonic()
            if requests or left <= 0:
                self._busy = self._busy or bool(requests)
                return requests
            await wait_event(self._work, left)

    async def put_results(self, results: Sequence[RequestOutput]) -> None:
        """Own requests' outputs stay here; stolen ones' go to their origins, every step."""
        outgoing: dict[str, list[bytes]] = {}
        for output in results:
            stolen = self._stolen.get(output.request_id)
            if stolen is None:
                self._keep(self.ledger.accept(output))
                continue
            if output.finished:
                del self._stolen[output.request_id]
            outgoing.setdefault(stolen.origin, []).append(Result(stolen.ticket, output).encode())
        for origin, messages in outgoing.items():
            await self._deliver(origin, messages)

    async def get_results(self, timeout: float = 0.0) -> dict[str, list[RequestOutput]]:
        """Everything for this instance's clients since the last call."""
        return await self._outbox.drain(timeout)

    async def abort(self, request_ids: Sequence[str]) -> None:
        """Forget these requests; whatever still arrives for them is dropped on arrival."""
        for rid in request_ids:
            self.ledger.forget(rid)
            self._outbox.drop(rid)

    async def get_unhandled_request_num(self) -> int:
        """Own requests still queued in Redis (as far as this instance knows)."""
        return self.ledger.queued_count()

    async def _take(self, capacity: Capacity) -> list[EngineRequest]:
        if not self.link.healthy:
            return []  # the keep-alive loop probes Redis with backoff; engine steps go on
        try:
            if self.ledger.queued_count():
                _, items = await self.queues.take(self.instance, capacity)
                own = [q.request for q in self._fresh(items) if self.ledger.take(q.ticket)]
                if own:
                    return own
            if not self._may_steal:
                return []
            self._may_steal = False
            self._probed_at = time.monotonic()
            victim, alive, items = await self.thief.steal(capacity)
        except RedisError as exc:
            self._redis_failed(exc)
            return []
        self.link.up()
        self._may_steal = bool(items)  # a victim may have more
        if not alive:
            log.warning("global_scheduler.dropped_dead_work", origin=victim, requests=len(items),
                        reason="its liveness key expired; its clients are gone")
            return []
        return [self._adopt(q) for q in self._fresh(items)]

    def _fresh(self, items: list[Queued]) -> list[Queued]:
        # Older ones were already failed to their clients by the origin's watchdog.
        deadline = time.time() - self.config.ttl
        return [q for q in items if q.queued_at > deadline]

    def _adopt(self, queued: Queued) -> EngineRequest:
        # Ids are unique per origin only: run under one that is unique everywhere.
        engine_id = f"{queued.request.request_id}@{queued.origin}/{queued.ticket}"
        self._stolen[engine_id] = queued
        return replace(queued.request, request_id=engine_id)

    async def _deliver(self, origin: str, messages: list[bytes]) -> None:
        if not self.link.healthy:
            return  # the origin notices the gap or the silence and fails the request
        try:
            delivered = await self.queues.deliver(origin, messages)
        except RedisError as exc:
            self._redis_failed(exc)
            return
        if not delivered:
            log.warning("global_scheduler.origin_gone", origin=origin)
            self._stolen = {k: q for k, q in self._stolen.items() if q.origin != origin}

    def _receive(self, messages: list[bytes]) -> None:
        for raw in messages:
            message = decode_message(raw)
            if isinstance(message, Claim):
                self.ledger.claim(message)
            else:
                self._keep(self.ledger.accept(message.output, message.ticket))

    def _keep(self, output: RequestOutput | None) -> None:
        if output is not None:
            self._outbox.add(output)

    def _fail(self, own: Own, message: str) -> None:
        self.ledger.forget(own.request_id)
        self._keep(failure(own.queued.request, f"request {own.request_id}: {message}"))

    def _steal_hint(self) -> None:
        self._may_steal = True
        self._work.set()

    def _data_lost(self) -> None:
        self.watchdog.data_lost()
        self._steal_hint()

    def _redis_failed(self, exc: RedisError) -> None:
        self.link.down(exc)
        self.keepalive.poke()
