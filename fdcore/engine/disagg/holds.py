"""Holds on KV blocks during a P-D hand-off (DESIGN 8.3): the router's lease, applied to blocks.

A hold owns a :class:`~fdcore.engine.block_manager.BlockTable`, so its blocks carry a reference
for as long as it lives: eviction only ever takes unreferenced cached blocks and preemption only
acts on running sequences, so neither can touch a held block. A hold is taken once per
``transfer_id`` and released exactly once, through :meth:`Holds.release` (directly, or by
:meth:`Holds.expire` when its deadline, renewed by the peer's heartbeats, passes). An aborted
reservation is not released at once: it is *quarantined* until the peer acknowledges the abort
or the deadline passes, so a write still in flight never lands in a block another sequence has
been given meanwhile.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from fdcore.engine.block_manager import BlockManager, BlockTable


class Side(enum.StrEnum):
    """Which end of the hand-off holds the blocks."""

    PREFILL = "prefill"  # P: source blocks pinned until the transfer is done
    DECODE = "decode"  # D: blocks reserved for the KV that P writes


class HoldState(enum.StrEnum):
    """Where a hold is in the hand-off."""

    RESERVED = "reserved"  # D: reserved, waiting for P's writes and ``done`` (AWAITING_KV)
    SENDING = "sending"  # P: prefill done, source blocks pinned while they are sent (SENDING_KV)
    QUARANTINED = "quarantined"  # aborted: kept until the peer's abort_ack or the deadline


class ReleaseReason(enum.StrEnum):
    """Why a hold ended (the ``reason`` label of the releases metric)."""

    DONE = "done"  # the transfer completed: D's blocks join its sequence, P's its prefix cache
    ABORTED = "aborted"  # the peer acknowledged an abort
    EXPIRED = "expired"  # the deadline passed without a heartbeat (or without the abort_ack)
    FAILED = "failed"  # the transfer failed (a ``fail``, a transport error)
    REJECTED = "rejected"  # the reservation was refused after being taken
    SHUTDOWN = "shutdown"  # the engine stopped


@dataclass(slots=True, eq=False)
class Hold:
    """One transfer's claim on blocks."""

    transfer_id: str
    request_id: str
    side: Side
    state: HoldState
    table: BlockTable
    deadline: float
    released: ReleaseReason | None = None

    @property
    def num_blocks(self) -> int:
        """Blocks this hold keeps (0 once released)."""
        return len(self.table.blocks)


class HoldError(Exception):
    """A hold operation that does not fit the hold's state (a duplicate transfer id)."""


class Holds:
    """Every hold of one engine, by transfer id.

    ``on_release(hold, reason)`` runs once per hold, before its table is freed: the place to
    hand D's blocks to the waiting sequence (take them over with their own table first) or to
    offer P's filled blocks to the prefix cache (:meth:`BlockManager.commit`), which keeps them
    cached after the hold's references go.
    """

    def __init__(
        self, blocks: BlockManager, clock: Callable[[], float] = time.monotonic,
        on_release: Callable[[Hold, ReleaseReason], None] | None = None,
    ) -> None:
        self.blocks = blocks
        self.clock = clock
        self.on_release = on_release
        self._holds: dict[str, Hold] = {}
        self.releases: Counter[tuple[Side, ReleaseReason]] = Counter()

    def __len__(self) -> int:
        return len(self._holds)

    def get(self, transfer_id: str) -> Hold | None:
        """The live hold of ``transfer_id``, if any."""
        return self._holds.get(transfer_id)

    def take(
        self, transfer_id: str, request_id: str, side: Side, state: HoldState,
        table: BlockTable, ttl: float,
    ) -> Hold:
        """Hold ``table``'s blocks for ``transfer_id`` until ``ttl`` seconds from now (the
        table's references now belong to the hold). A transfer id is held at most once."""
        if transfer_id in self._holds:
            raise HoldError(f"transfer {transfer_id} already holds blocks")
        hold = Hold(transfer_id, request_id, side, state, table, self.clock() + ttl)
        self._holds[transfer_id] = hold
        return hold

    def renew(self, transfer_id: str, ttl: float) -> bool:
        """Push the deadline to ``ttl`` seconds from now (a heartbeat from the peer); a
        quarantined hold is not renewed: it waits for the ack or its deadline."""
        hold = self._holds.get(transfer_id)
        if hold is None or hold.state is HoldState.QUARANTINED:
            return False
        hold.deadline = max(hold.deadline, self.clock() + ttl)
        return True

    def advance(self, transfer_id: str, state: HoldState) -> bool:
        """Move a live, not quarantined hold to ``state``."""
        hold = self._holds.get(transfer_id)
        if hold is None or hold.state is HoldState.QUARANTINED:
            return False
        hold.state = state
        return True

    def quarantine(self, transfer_id: str, ttl: float) -> bool:
        """An abort: keep the blocks (a write may still land) until :meth:`release` with
        :attr:`ReleaseReason.ABORTED` (the peer's ack) or ``ttl`` seconds pass."""
        hold = self._holds.get(transfer_id)
        if hold is None:
            return False
        if hold.state is not HoldState.QUARANTINED:
            hold.state = HoldState.QUARANTINED
            hold.deadline = self.clock() + ttl
        return True

    def release(self, transfer_id: str, reason: ReleaseReason) -> Hold | None:
        """End the hold: ``on_release`` runs, then its blocks' references are dropped. Returns
        the hold, or ``None`` when there is none (already released, or never taken): every
        hold is released exactly once, however many paths try."""
        hold = self._holds.pop(transfer_id, None)
        if hold is None:
            return None
        hold.released = reason
        self.releases[(hold.side, reason)] += 1
        try:
            if self.on_release is not None:
                self.on_release(hold, reason)
        finally:
            self.blocks.free(hold.table)
        return hold

    def expire(self) -> list[Hold]:
        """Release every hold whose deadline has passed (:attr:`ReleaseReason.EXPIRED`)."""
        now = self.clock()
        due = [tid for tid, hold in self._holds.items() if hold.deadline <= now]
        return [hold for tid in due if (hold := self.release(tid, ReleaseReason.EXPIRED))]

    def due(self, side: Side | None = None) -> list[Hold]:
        """Live holds (of ``side``) whose deadline has passed, left for the caller to end."""
        now = self.clock()
        return [hold for hold in self._holds.values()
                if hold.deadline <= now and (side is None or hold.side is side)]

    def release_all(self, reason: ReleaseReason = ReleaseReason.SHUTDOWN) -> int:
        """Release every hold (engine shutdown); returns how many there were."""
        ids = list(self._holds)
        for tid in ids:
            self.release(tid, reason)
        return len(ids)

    def next_deadline(self) -> float | None:
        """The soonest deadline among live holds (when :meth:`expire` has work next)."""
        return min((hold.deadline for hold in self._holds.values()), default=None)

    def held_blocks(self) -> dict[tuple[Side, HoldState], int]:
        """Blocks held now, by side and state (the held-blocks gauge)."""
        counts: Counter[tuple[Side, HoldState]] = Counter()
        for hold in self._holds.values():
            counts[(hold.side, hold.state)] += hold.num_blocks
        return dict(counts)
