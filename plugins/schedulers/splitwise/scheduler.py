"""``splitwise``: prefill/decode disaggregation over Redis, without a router.

Every instance (prefill, decode or mixed) publishes its card and load in the topic's cluster
hash. The instance a client calls (the origin) picks a prefill and a decode instance (or one
mixed instance) by blurred least load, queues the request, with ``disaggregate_info``, in both
their queues, and streams the decode instance's outputs to its client from its own streams.
The KV cache moves between them through the engine's P-D hand-off, as in router mode. See
docs/schedulers.md ("splitwise") for the rules and what each failure gives the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from redis.exceptions import RedisError

from fdcore.bases import BaseScheduler
from fdcore.engine.disagg.info import DISAGG_KEY
from fdcore.errors import StartupError
from fdcore.outbox import Outbox
from fdcore.redis import RedisLink
from fdcore.router.pairing import disaggregate_info
from fdcore.tasks import cancel_stubborn
from fdcore.types import (
    PD_ERROR,
    Capacity,
    EngineRequest,
    Rejection,
    RejectionKind,
    RequestOutput,
    SchedulerContext,
)

from ..global_.ledger import Ledger, failure
from ..global_.wire import Claim, Queued, decode_message
from .cluster import Cluster
from .config import SplitwiseConfig
from .executor import ABORT, Executor
from .keys import Keys
from .picker import NoPlacement, Placement, place
from .readers import Reader

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Sent:
    """One own request placed on the cluster."""

    request: EngineRequest  # as the client sent it
    ticket: str
    placement: Placement
    sent_at: float  # monotonic: first placed (the ttl counts from here)
    placed_at: float = 0.0  # monotonic: this placement (the claim deadline counts from here)
    claimed: set[str] = field(default_factory=set)
    started: bool = False  # a token reached the client: P's part is over
    attempt: int = 0  # placements before this one
    avoid: frozenset[str] = frozenset()  # instances of failed attempts

    @property
    def request_id(self) -> str:
        """The id the client knows."""
        return self.request.request_id

    @property
    def failed(self) -> frozenset[str]:
        """What a retry after this attempt avoids: its instances and those avoided before."""
        return self.avoid | set(self.nodes)

    @property
    def nodes(self) -> list[str]:
        """The instances it was queued on."""
        decode = self.placement.decode
        return [self.placement.prefill.name] + ([decode.name] if decode else [])

    def needed(self) -> list[tuple[str, str]]:
        """``(instance, role)`` pairs the request still depends on."""
        p, d = self.placement.prefill, self.placement.decode
        if d is None:
            return [(p.name, p.role.value)]
        return ([] if self.started else [(p.name, "prefill")]) + [(d.name, "decode")]


class SplitwiseScheduler(BaseScheduler[SplitwiseConfig]):
    """The ``splitwise`` scheduler plugin (FastDeploy's SplitWiseScheduler; module doc)."""

    name = "splitwise"
    Config = SplitwiseConfig

    def __init__(self, config: SplitwiseConfig, context: SchedulerContext) -> None:
        super().__init__(config, context)
        self.instance = context.instance_id
        self.link = RedisLink(config, f"scheduler {self.name!r}")
        self.keys = Keys(config.topic)
        self.ledger = Ledger(self.instance)
        self.executor = Executor(self.link, self.keys, config, self.instance, context.role,
                                 lambda: context.cancel)
        card = context.card or {"role": context.role.value, "host_ip": context.host,
                                "port": context.port}
        self.cluster = Cluster(self.link, self.keys, config, self.instance, card,
                               lambda: self.executor.load)
        self.readers = [Reader(self.link, self.keys.outputs(self.instance, i),
                               config.reader_batch_size, self._receive)
                        for i in range(config.reader_parallel)]
        self._sent: dict[str, Sent] = {}  # by ticket
        self._outbox = Outbox()
        self._next_reader = itertools.count()
        self._rng = random.Random()
        self._ttl = math.ceil(config.ttl)
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()  # re-placements under way
        self._replacing: dict[str, Sent] = {}  # by request id: failed, being placed again

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Check Redis, clear what a previous run under this name left, publish, start."""
        await self.link.check()
        try:
            await self._reset()
            await self.cluster.publish()
        except RedisError as exc:
            raise StartupError(f"{self.link.owner}: Redis at {self.link.address}: {exc}") from None
        loops: list[Coroutine[Any, Any, None]] = [
            self.cluster.heartbeat.run(), self.executor.run(), self.executor.write(),
            self._watch(),
            *(reader.run() for reader in self.readers),
        ]
        self._tasks = [asyncio.create_task(loop, name="splitwise-scheduler") for loop in loops]
        log.info("splitwise_scheduler.started", instance=self.instance, role=self.context.role,
                 redis=self.link.address, topic=self.config.topic)

    async def stop(self) -> None:
        """Stop the loops; leave Redis as if this instance had never been there."""
        stuck = await cancel_stubborn([*self._tasks, *self._background])
        if stuck:
            log.warning("splitwise_scheduler.stop_incomplete", tasks=stuck)
        with contextlib.suppress(RedisError):
            await self.cluster.withdraw()
            await self._reset()
        await self.link.close()

    async def _reset(self) -> None:
        keys = [self.keys.queue(self.instance), *(r.key for r in self.readers)]
        await self.link.client.delete(*keys)

    def health(self) -> str | None:
        """None while Redis answers; otherwise why this instance cannot serve."""
        return self.link.health()

    # -- the origin's side ----------------------------------------------------------------

    async def put_requests(self, requests: Sequence[EngineRequest]) -> list[Rejection]:
        """Place each request on a prefill and a decode instance (or a mixed one) and queue
        it there; refused alone for a duplicate id or no usable instance, all together when
        Redis is unreachable."""
        rejected: list[Rejection] = []
        try:
            nodes = await self.cluster.nodes()
        except RedisError as exc:
            self.link.down(exc)
            message = f"the splitwise scheduler cannot reach Redis: {self.link.error}"
            return [Rejection(r.request_id, RejectionKind.UNAVAILABLE, message) for r in requests]
        batch: list[tuple[Sent, Queued]] = []
        for request in requests:
            rid = request.request_id
            if rid in self.ledger or rid in self._replacing:
                rejected.append(
                    Rejection(rid, RejectionKind.DUPLICATE_ID, f"duplicate request_id: {rid}"))
                continue
            try:
                placement = place(request, nodes, self.config.topic, self._rng)
            except NoPlacement as exc:
                rejected.append(Rejection(rid, RejectionKind.UNAVAILABLE, str(exc)))
                continue
            batch.append(self._booked(request, placement))
        if not batch:
            return rejected
        try:
            await self._queue(batch)
        except RedisError as exc:
            self.link.down(exc)
            for sent, _ in batch:
                self.ledger.forget(sent.request_id)
            message = f"the splitwise scheduler cannot queue requests: {self.link.error}"
            return rejected + [Rejection(sent.request_id, RejectionKind.UNAVAILABLE, message)
                               for sent, _ in batch]
        self.link.up()
        for sent, _ in batch:
            self._placed(sent)
        return rejected

    def _booked(self, request: EngineRequest, placement: Placement,
                after: Sent | None = None) -> tuple[Sent, Queued]:
        queued = self.ledger.add(request)
        now = time.monotonic()
        sent = Sent(request, queued.ticket, placement, now, now)
        if after is not None:
            sent.attempt, sent.sent_at, sent.avoid = after.attempt + 1, after.sent_at, after.failed
        return sent, self._envelope(queued, placement)

    def _placed(self, sent: Sent) -> None:
        self._sent[sent.ticket] = sent
        p, d = sent.placement.prefill, sent.placement.decode
        self.cluster.bump(p.name, sent.request.prompt_len)
        if d is not None:
            self.cluster.bump(d.name, 1)
        log.debug("splitwise.placed", request_id=sent.request_id, prefill=p.name,
                  decode=d.name if d else None, protocol=sent.placement.protocol,
                  attempt=sent.attempt)

    def _may_retry(self, sent: Sent) -> bool:
        """A hand-off that failed before the client's first token, with retries left."""
        return (sent.placement.decode is not None and not sent.started
                and sent.attempt < self.config.pd_retry_count)

    def _retry_or_fail(self, sent: Sent, message: str) -> None:
        """Place the request again, away from the failed pair, when :meth:`_may_retry`;
        else fail it with ``message``."""
        if not self._may_retry(sent):
            self._fail(sent, message)
            return
        self._sent.pop(sent.ticket, None)
        self.ledger.forget(sent.request_id)
        self._retry(sent, message)

    def _retry(self, sent: Sent, message: str) -> None:
        """``sent`` (no longer booked) failed: tell its pair to stop, place it again."""
        self._notify_abort(sent)
        self._replacing[sent.request_id] = sent
        log.warning("splitwise.rescheduled", request_id=sent.request_id, why=message,
                    attempt=sent.attempt + 1, retries=self.config.pd_retry_count)
        task = asyncio.get_running_loop().create_task(self._requeue(sent, message))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _requeue(self, failed: Sent, message: str) -> None:
        request = failed.request
        placement: Placement | None = None
        try:
            nodes = await self.cluster.nodes()
            placement = place(request, nodes, self.config.topic, self._rng, failed.failed)
            why = ""
        except RedisError as exc:
            self.link.down(exc)
            why = f"{message}; placing it again failed: {self.link.error}"
        except NoPlacement as exc:
            why = f"{message}; no other pair: {exc}"
        if self._replacing.pop(request.request_id, None) is not failed:
            return  # its client left meanwhile
        if placement is not None:
            sent, queued = self._booked(request, placement, failed)
            try:
                await self._queue([(sent, queued)])
            except RedisError as exc:
                self.ledger.forget(sent.request_id)
                self.link.down(exc)
                why = f"{message}; placing it again failed: {self.link.error}"
            else:
                self._placed(sent)
                return
        self._outbox.add(failure(request, f"request {request.request_id}: {why}"))

    def _envelope(self, queued: Queued, placement: Placement) -> Queued:
        reply = self.readers[next(self._next_reader) % len(self.readers)].key
        request = queued.request
        if placement.decode is not None:
            info = disaggregate_info(placement.prefill.instance, placement.decode.instance,
                                     placement.protocol, f"{self.instance}/{queued.ticket}")
            request = replace(request, extra={**request.extra, DISAGG_KEY: info})
        return replace(queued, request=request, reply=reply)

    async def _queue(self, batch: list[tuple[Sent, Queued]]) -> None:
        async with self.link.client.pipeline(transaction=False) as pipe:
            for sent, queued in batch:
                raw = queued.encode()
                # D first: its half usually waits for P's prefill frame, not the other way.
                for name in reversed(sent.nodes):
                    pipe.rpush(self.keys.queue(name), raw)
                    pipe.expire(self.keys.queue(name), self._ttl)
            await pipe.execute()

    def _receive(self, messages: list[bytes]) -> None:
        for raw in messages:
            try:
                message = decode_message(raw)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("splitwise.bad_output", error=str(exc))
                continue
            if isinstance(message, Claim):
                for ticket in message.tickets:
                    sent = self._sent.get(ticket)
                    if sent is not None:
                        sent.claimed.add(message.by)
                self.ledger.claim(message)
                continue
            output = self.ledger.accept(message.output, message.ticket)
            sent = self._sent.get(message.ticket)
            if output is None or sent is None:
                continue
            sent.started = sent.started or bool(output.token_ids)
            if output.finished:
                del self._sent[message.ticket]  # (and the ledger forgot it)
                if output.error is not None:
                    if PD_ERROR in output.error and self._may_retry(sent):
                        self._retry(sent, output.error)
                        continue
                    self._notify_abort(sent)  # e.g. P failed: D need not wait for it
            self._outbox.add(output)

    async def get_results(self, timeout: float = 0.0) -> dict[str, list[RequestOutput]]:
        """Everything for this instance's clients since the last call."""
        return await self._outbox.drain(timeout)

    async def abort(self, request_ids: Sequence[str]) -> None:
        """Forget these requests and tell the instances running them to stop."""
        for rid in request_ids:
            own = self.ledger.forget(rid)
            self._outbox.drop(rid)
            self._replacing.pop(rid, None)  # a re-placement under way then stops
            if own is not None:
                sent = self._sent.pop(own.queued.ticket, None)
                if sent is not None:
                    self._notify_abort(sent)

    async def get_unhandled_request_num(self) -> int:
        """Own requests not yet taken by every instance they were queued on."""
        return sum(1 for s in self._sent.values() if len(s.claimed) < len(s.nodes))

    def _notify_abort(self, sent: Sent) -> None:
        task = asyncio.get_running_loop().create_task(self._send_abort(sent))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _send_abort(self, sent: Sent) -> None:
        try:
            async with self.link.client.pipeline(transaction=False) as pipe:
                for name in sent.nodes:
                    pipe.rpush(self.keys.queue(name), ABORT + sent.ticket.encode())
                    pipe.expire(self.keys.queue(name), self._ttl)
                await pipe.execute()
        except RedisError as exc:  # the executors drop it when this origin is gone
            self.link.down(exc)

    def _fail(self, sent: Sent, message: str) -> None:
        self._sent.pop(sent.ticket, None)
        own = self.ledger.forget(sent.request_id)
        if own is not None:
            log.warning("splitwise.failed", request_id=sent.request_id, why=message)
            self._outbox.add(failure(own.queued.request, f"request {sent.request_id}: {message}"))
            self._notify_abort(sent)

    # -- the watchdog ---------------------------------------------------------------------

    async def _watch(self) -> None:
        """Fail own requests that can no longer finish; drop work whose origin is gone."""
        tick = min(1.0, self.config.expire_secs / 3)
        while True:
            await asyncio.sleep(tick)
            try:
                await self.cluster.nodes()
            except RedisError as exc:
                self.link.down(exc)
            self._check(time.monotonic())

    def _check(self, now: float) -> None:
        expire = self.config.expire_secs
        down_since = self.link.down_since
        if down_since is not None and now - down_since >= expire:
            for sent in list(self._sent.values()):
                self._fail(sent, f"Redis at {self.link.address} has been unreachable for "
                                 f"{expire:g} s")
            return
        claim_by = max(2 * expire, 2.0)
        for sent in list(self._sent.values()):
            if now - sent.sent_at > self.config.ttl:
                self._fail(sent, f"did not finish within the scheduler's ttl "
                                 f"({self.config.ttl:g} s)")
                continue
            gone = [(n, r) for n, r in sent.needed() if self.cluster.gone(n)]
            if gone:
                name, role = gone[0]
                self._retry_or_fail(sent, f"the {role} instance {name} stopped (no news from "
                                          f"it for {expire:g} s)")
            elif len(sent.claimed) < len(sent.nodes) and now - sent.placed_at > claim_by:
                missing = sorted(set(sent.nodes) - sent.claimed)
                self._retry_or_fail(sent, f"was not taken by {', '.join(missing)} within "
                                          f"{claim_by:g} s (its queue was lost, e.g. Redis "
                                          "restarted)")
        for origin in self.executor.origins():
            if self.cluster.gone(origin):
                self.executor.drop_origin(origin)

    # -- the running side -----------------------------------------------------------------

    async def get_requests(self, capacity: Capacity, timeout: float = 0.0) -> list[EngineRequest]:
        """Work queued here by any origin (see :meth:`Executor.take`)."""
        return await self.executor.take(capacity, timeout)

    async def put_results(self, results: Sequence[RequestOutput]) -> None:
        """Outputs of work run here, to their origins."""
        await self.executor.put_results(results)
