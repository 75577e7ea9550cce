"""What both ends of a hand-off share: settings, the engine's parts they touch, and output."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from fdcore.engine.batcher import Batcher
from fdcore.engine.block_manager import BlockManager
from fdcore.engine.disagg.connector import Connector
from fdcore.engine.disagg.holds import Holds
from fdcore.engine.disagg.metrics import DisaggMetrics
from fdcore.engine.runner import Tokenizer
from fdcore.engine.sequence import Seq
from fdcore.kv import KVLayout
from fdcore.types import PD_ERROR, RequestOutput, Transport

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class PDSettings:
    """The hand-off's deadlines (``fdcore engine --pd-*``)."""

    hold_secs: float = 10.0  # a hold lives this long past the peer's last heartbeat
    first_contact_secs: float = 30.0  # D waits this long for P's prefill (and P for D)

    @property
    def quarantine_secs(self) -> float:
        """How long an aborted or lapsed reservation stays untouchable without the peer's
        ``abort_ack`` (a peer that lost contact for ``hold_secs`` stops writing by itself)."""
        return 3 * self.hold_secs

    @property
    def heartbeat_secs(self) -> float:
        """How often each side tells its peers which transfers it still wants."""
        return max(self.hold_secs / 4, 0.02)


class Pulse:
    """Notices when this process stopped running for a while (SIGSTOP, a frozen VM).

    The sweeper ticks it every heartbeat; a gap longer than ``limit`` means every peer has
    given up on us meanwhile, so frames read just after (queued before the pause) prove
    nothing about the peer being alive now, and reservations the peer made must be treated
    as lapsed. Until the next tick after a long gap, :meth:`stale` is true.
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.last = time.monotonic()
        self.epoch = 0  # bumped on every long gap: contact older than it is void

    def tick(self) -> None:
        """Called by the sweeper on schedule."""
        now = time.monotonic()
        if now - self.last > self.limit:
            self.epoch += 1
        self.last = now

    def stale(self) -> bool:
        """Whether the process has been away longer than ``limit`` since the last tick."""
        return time.monotonic() - self.last > self.limit


@dataclass(slots=True)
class EngineParts:
    """The engine parts a hand-off works with (all used on the event loop only)."""

    batcher: Batcher
    blocks: BlockManager
    tokenizer: Tokenizer
    finish: Callable[[Seq, int], str | None]  # the engine loop's stop rule for a new token
    emit: Callable[[list[RequestOutput]], Awaitable[None]]  # to the request's client
    abort: Callable[[str], None]  # take a sequence out of the batch at the next step
    on_admit: Callable[[Seq], None] | None = None


class Side:
    """Base of the prefill and decode ends."""

    def __init__(
        self, *, settings: PDSettings, parts: EngineParts, connector: Connector, holds: Holds,
        metrics: DisaggMetrics, layout: KVLayout, transports: Mapping[str, Transport],
        pulse: Pulse,
    ) -> None:
        self.pulse = pulse
        self.settings = settings
        self.parts = parts
        self.connector = connector
        self.holds = holds
        self.metrics = metrics
        self.layout = layout
        self.transports = transports
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def epoch(self) -> int:
        """This engine's epoch (stamped on every frame)."""
        return self.connector.epoch

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, kept until it ends (failures are logged)."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pd.task_failed", task=task.get_name(), error=repr(task.exception()))

    def output(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their clients (in the background: callers are sync handlers)."""
        if outputs:
            self.spawn(self.parts.emit(outputs), "fdcore-pd-emit")

    def error(self, request_id: str, prompt_tokens: int, message: str,
              status: int = 503) -> RequestOutput:
        """A finishing error output naming the hand-off failure (``PD Error: ...``)."""
        return RequestOutput(request_id=request_id, token_ids=[], finished=True,
                             finish_reason="error", prompt_tokens=prompt_tokens,
                             error=f"{PD_ERROR}: {message}", error_code=status)

    async def stop(self) -> None:
        """Cancel background work."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def now() -> float:
        """The clock every deadline is read on."""
        return time.monotonic()
