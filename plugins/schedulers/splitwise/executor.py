"""The running side: take the work queued for this instance, run it, send its outputs back.

The intake loop pops this instance's queue as soon as work lands (like FastDeploy's infer
scheduler, into a local queue the engine takes from), tells each origin which of its requests
were taken (a claim), and books each under an id unique across the cluster,
``{request_id}@{origin}/{ticket}``. Outputs go to the origin's stream named in the envelope.
On a prefill instance, a hand-off's own answer stays here (the decode instance streams the
client's tokens, P's first one included); only its errors go back, so the origin hears at once
when a hand-off failed. Abort notes from an origin whose client left take the request out of
the engine (``SchedulerContext.cancel``): its blocks are freed and nothing more is sent.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import structlog
from redis.exceptions import RedisError

from fdcore.engine.disagg.info import DISAGG_KEY
from fdcore.redis import Backoff, RedisLink, pop_batch, until_done
from fdcore.tasks import wait_event
from fdcore.types import Capacity, EngineRequest, RequestOutput, Role

from ..global_.wire import Claim, Queued, Result
from .config import SplitwiseConfig
from .keys import Keys

log = structlog.get_logger(__name__)

ABORT = b"!abort "  # an abort note in a queue: ``!abort <ticket>``
_BLOCK_SECONDS = 1.0
_RENEW_SECS = 1.0  # a stream's TTL is renewed at most this often (a new stream gets it at once)


@dataclass(slots=True)
class Job:
    """One request this instance runs for an origin."""

    queued: Queued
    engine_id: str
    load: int  # what it adds to this instance's published load
    handoff: bool  # it carries ``disaggregate_info``
    heard_at: float  # monotonic: taken, or last output
    taken: bool = False  # handed to the engine


class Executor:
    """This instance's share of the cluster's work."""

    def __init__(self, link: RedisLink, keys: Keys, config: SplitwiseConfig, name: str,
                 role: Role, cancel: Callable[[], Callable[[str], None] | None]) -> None:
        self.link = link
        self.keys = keys
        self.config = config
        self.name = name
        self.role = role
        self.cancel = cancel  # the engine's, once it is built
        self.jobs: dict[str, Job] = {}  # by engine id
        self._by_ticket: dict[str, str] = {}
        self._ready: deque[EngineRequest] = deque()
        self._work = asyncio.Event()
        self._ttl = math.ceil(config.ttl)
        self._writes = asyncio.Semaphore(config.writer_parallel)
        # Outputs wait here for the writer task: the engine's step never waits on Redis, and
        # whatever piles up meanwhile goes out in one pipeline per stream.
        self._pending: dict[str, list[bytes]] = {}
        self._flush = asyncio.Event()
        self._expires: dict[str, float] = {}  # stream -> monotonic time its TTL was renewed

    @property
    def load(self) -> int:
        """Queued prompt tokens (prefill, mixed) or requests (decode) of running work."""
        now = time.monotonic()
        limit = self.config.release_load_expire_period
        return sum(job.load for job in self.jobs.values() if now - job.heard_at < limit)

    # -- intake ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Pop this instance's queue forever."""
        backoff = Backoff()
        key = self.keys.queue(self.name)

        def pop() -> Awaitable[list[bytes]]:
            return pop_batch(self.link, key, self.config.reader_batch_size, _BLOCK_SECONDS)

        while True:
            batch = await until_done(self.link, backoff, pop)
            if batch:
                await self._intake(batch)

    async def _intake(self, raws: list[bytes]) -> None:
        claims: dict[str, list[str]] = {}
        for raw in raws:
            if raw.startswith(ABORT):
                self.drop_ticket(raw[len(ABORT):].decode(), "its client left")
                continue
            try:
                queued = Queued.decode(raw)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("splitwise.bad_queued_work", error=str(exc))
                continue
            if queued.queued_at < time.time() - self.config.ttl:
                continue  # its origin has failed it by now
            self._book(queued)
            claims.setdefault(queued.reply, []).append(queued.ticket)
        for reply, tickets in claims.items():
            self._post(reply, Claim(self.name, tickets).encode())
        self._work.set()

    def _book(self, queued: Queued) -> None:
        request = queued.request
        engine_id = f"{request.request_id}@{queued.origin}/{queued.ticket}"
        handoff = DISAGG_KEY in request.extra
        load = 1 if self.role is Role.DECODE else request.prompt_len
        self.jobs[engine_id] = Job(queued, engine_id, load, handoff, time.monotonic())
        self._by_ticket[queued.ticket] = engine_id
        self._ready.append(replace(request, request_id=engine_id))

    def drop_ticket(self, ticket: str, why: str) -> None:
        """Stop a request nobody waits for any more (out of the engine, blocks freed)."""
        engine_id = self._by_ticket.pop(ticket, None)
        job = self.jobs.pop(engine_id, None) if engine_id else None
        if job is None:
            return
        log.info("splitwise.dropped", request_id=job.engine_id, why=why)
        if not job.taken:
            self._ready = deque(r for r in self._ready if r.request_id != engine_id)
            return
        cancel = self.cancel()
        if cancel is not None:
            cancel(job.engine_id)

    def origins(self) -> set[str]:
        """Instances whose requests run here."""
        return {job.queued.origin for job in self.jobs.values()}

    def drop_origin(self, origin: str) -> None:
        """``origin`` is gone: its clients with it."""
        for job in [j for j in self.jobs.values() if j.queued.origin == origin]:
            self.drop_ticket(job.queued.ticket, f"its origin {origin} is gone")

    # -- the engine's side ----------------------------------------------------------------

    async def take(self, capacity: Capacity, timeout: float) -> list[EngineRequest]:
        """Hand-offs to a decode engine at once (its reservation decides); other work as
        ``capacity`` admits, waiting up to ``timeout`` for some."""
        if not self._ready and timeout > 0:
            self._work.clear()
            await wait_event(self._work, timeout)
        taken: list[EngineRequest] = []
        if self.role is Role.DECODE:
            taken = [r for r in self._ready if DISAGG_KEY in r.extra]
            self._ready = deque(r for r in self._ready if DISAGG_KEY not in r.extra)
        head = list(self._ready)[: capacity.batch]
        for _ in range(capacity.admissible(head)):
            taken.append(self._ready.popleft())
        for request in taken:
            job = self.jobs.get(request.request_id)
            if job is not None:
                job.taken = True
        return taken

    async def put_results(self, results: Sequence[RequestOutput]) -> None:
        """Queue outputs for their origins (a hand-off's own answer on P stays here)."""
        now = time.monotonic()
        for output in results:
            job = self.jobs.get(output.request_id)
            if job is None:
                continue  # dropped meanwhile
            job.heard_at = now
            if output.finished:
                del self.jobs[output.request_id]
                self._by_ticket.pop(job.queued.ticket, None)
            if job.handoff and self.role is Role.PREFILL and output.error is None:
                continue
            self._post(job.queued.reply, Result(job.queued.ticket, output).encode())

    def _post(self, key: str, message: bytes) -> None:
        self._pending.setdefault(key, []).append(message)
        self._flush.set()

    async def write(self) -> None:
        """Write what is pending, in order, forever (one batch at a time)."""
        while True:
            await self._flush.wait()
            self._flush.clear()
            pending, self._pending = self._pending, {}
            await self._send(pending)

    async def _send(self, outgoing: dict[str, list[bytes]]) -> None:
        chunks = [(key, messages[i:i + self.config.writer_batch_size])
                  for key, messages in outgoing.items() if messages
                  for i in range(0, len(messages), self.config.writer_batch_size)]
        if chunks:
            await asyncio.gather(*(self._write(key, chunk) for key, chunk in chunks))

    async def _write(self, key: str, messages: list[bytes]) -> None:
        now = time.monotonic()
        renew = now - self._expires.get(key, -math.inf) >= _RENEW_SECS
        async with self._writes:
            try:
                async with self.link.client.pipeline(transaction=False) as pipe:
                    for message in messages:
                        pipe.xadd(key, {"m": message})
                    if renew:
                        pipe.expire(key, self._ttl)
                    await pipe.execute()
                if renew:
                    self._expires[key] = now
            except RedisError as exc:
                self.link.down(exc)
                log.warning("splitwise.outputs_lost", stream=key, outputs=len(messages),
                            error=str(exc))
                return
        self.link.up()
