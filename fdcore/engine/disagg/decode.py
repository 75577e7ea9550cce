"""D's end of a hand-off: reserve blocks for P's prompt, wait for ``done``, decode on.

D's API hands the client's request here as it arrives (not through the scheduler: it is pinned
to this engine, and its reservation, not a queue, decides whether it fits); P's ``prefill``
frame may arrive before or after it, and each waits for the other at most
``first_contact_secs``. D reserves the blocks its own prefix cache lacks (a DECODE hold, renewed
by P's heartbeats), answers ``cache_sync`` or ``reject``, and on ``done`` takes the blocks over
as a sequence whose prompt is computed, whose first output is P's token. Aborts and lapsed
reservations are quarantined until P's ``abort_ack`` or ``quarantine_secs``, so a late write
never lands in blocks another sequence was given.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from fdcore.engine.block_manager import BlockTable, OutOfBlocks
from fdcore.engine.disagg.holds import HoldState, ReleaseReason
from fdcore.engine.disagg.holds import Side as HoldSide
from fdcore.engine.disagg.info import DisaggInfo
from fdcore.engine.disagg.messages import (
    Abort,
    AbortAck,
    CacheSync,
    Done,
    Fail,
    Heartbeat,
    Message,
    Prefill,
    Reject,
)
from fdcore.engine.disagg.side import Side
from fdcore.engine.sequence import Seq
from fdcore.types import EngineRequest, RequestOutput

log = structlog.get_logger(__name__)


@dataclass(slots=True, eq=False)
class Incoming:
    """One request D takes over from P."""

    transfer_id: str
    deadline: float  # first contact: until then the other half (request or prefill) may come
    request: EngineRequest | None = None
    info: DisaggInfo | None = None
    prefill: Prefill | None = None
    peer: str = ""  # P's connector (its frames' sender)
    peer_epoch: int = 0
    written_blocks: int = 0  # blocks P writes (those D's prefix cache lacked)
    answered: bool = False  # D's client has had its final answer (an error)

    @property
    def request_id(self) -> str:
        """The request's id (from whichever half came first)."""
        if self.request is not None:
            return self.request.request_id
        return self.prefill.request_id if self.prefill is not None else ""


def info_protocol(inc: Incoming) -> str:
    """The transport a hand-off uses."""
    return inc.info.transfer_protocol if inc.info is not None else ""


class DecodeSide(Side):
    """Every hand-off this D engine has in flight, by transfer id."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.handles: Mapping[str, dict[str, Any]] = {}  # set at start: protocol -> handle
        self._by_transfer: dict[str, Incoming] = {}
        self._by_request: dict[str, Incoming] = {}
        self._adopted: list[tuple[Seq, RequestOutput]] = []

    def __len__(self) -> int:
        return len(self._by_transfer) + len(self._adopted)

    def knows(self, request_id: str) -> bool:
        """Whether ``request_id`` waits here for its KV (or to join the batch)."""
        return request_id in self._by_request or any(
            s.request_id == request_id for s, _ in self._adopted)

    # -- the engine loop's calls ------------------------------------------------------------

    def expect(self, request: EngineRequest, info: DisaggInfo) -> None:
        """The client's request arrived: wait for P's ``prefill`` (or use it, if it came)."""
        tid = info.transfer(request.request_id)
        inc = self._by_transfer.get(tid)
        if inc is None:
            inc = self._by_transfer[tid] = Incoming(
                tid, self.now() + self.settings.first_contact_secs)
        elif inc.request is not None:
            self.output([self.error(request.request_id, request.prompt_len,
                                    f"transfer {tid} is already in use", 409)])
            return
        inc.request, inc.info = request, info
        self._by_request[request.request_id] = inc
        if inc.prefill is not None:
            self._reserve(inc)

    def take_adopted(self) -> list[tuple[Seq, RequestOutput]]:
        """Sequences whose KV has arrived, with their first output (P's token): the loop
        emits the output, then runs them."""
        adopted, self._adopted = self._adopted, []
        return adopted

    def abort(self, request_id: str, why: str) -> None:
        """D's client left or the router aborted: stop the hand-off (the API answers)."""
        for i, (seq, _) in enumerate(self._adopted):
            if seq.request_id == request_id:
                del self._adopted[i]
                self.parts.blocks.free(seq.table)
                return
        inc = self._by_request.get(request_id)
        if inc is not None:
            inc.answered = True
            self._stop(inc, why)

    # -- frames from P ----------------------------------------------------------------------

    def on_message(self, message: Message, sender: str) -> None:
        """A frame from a P engine."""
        if isinstance(message, Heartbeat):
            if not self.pulse.stale():
                for tid in message.transfer_ids:
                    inc = self._by_transfer.get(tid)
                    if inc is not None and inc.peer == sender:
                        self.holds.renew(tid, self.settings.hold_secs)
            return
        if isinstance(message, Prefill):
            self._on_prefill(message, sender)
            return
        inc = self._by_transfer.get(message.transfer_id)
        if inc is None or inc.peer != sender or message.epoch != inc.peer_epoch:
            if isinstance(message, Abort):  # nothing here: nothing will be written
                self.connector.send(sender, AbortAck(message.transfer_id, message.request_id,
                                                     self.epoch))
            return
        if isinstance(message, Done):
            self._on_done(inc, message)
        elif isinstance(message, Fail):
            self._end(inc, ReleaseReason.FAILED, f"prefill failed: {message.message}")
        elif isinstance(message, Abort):
            # P sends abort only once none of its writes is in flight.
            self.connector.send(sender, AbortAck(inc.transfer_id, message.request_id,
                                                 self.epoch))
            self._end(inc, ReleaseReason.ABORTED, f"aborted by the prefill instance: "
                      f"{message.reason}")
        elif isinstance(message, AbortAck):
            hold = self.holds.get(inc.transfer_id)
            if hold is not None and hold.state is HoldState.QUARANTINED:
                self._end(inc, ReleaseReason.ABORTED, "aborted")

    def on_restart(self, sender: str, old_epoch: int) -> None:
        """A P engine restarted: what it had in flight will never come."""
        for inc in list(self._by_transfer.values()):
            if inc.peer == sender and inc.peer_epoch <= old_epoch:
                self._end(inc, ReleaseReason.FAILED, "the prefill instance restarted")

    def expire(self) -> None:
        """First contacts that never came, reservations P stopped renewing, quarantines over."""
        now = self.now()
        for inc in list(self._by_transfer.values()):
            if self.holds.get(inc.transfer_id) is None and inc.deadline <= now:
                if inc.request is None and inc.prefill is not None:
                    self._refuse(inc, "no_request", "the decode instance never received the "
                                 "request")
                else:
                    self._end(inc, ReleaseReason.EXPIRED, "no prefill arrived from the "
                              f"prefill instance within {self.settings.first_contact_secs:g} s")
        for hold in self.holds.due(HoldSide.DECODE):
            held = self._by_transfer.get(hold.transfer_id)
            if hold.state is HoldState.QUARANTINED or held is None:
                self.holds.release(hold.transfer_id, ReleaseReason.EXPIRED)
                if held is not None:
                    self._forget(held)
            else:
                self._stop(held, "the prefill instance stopped answering")

    def heartbeats(self) -> dict[str, list[str]]:
        """Reservations still held, by P address (the heartbeat's content)."""
        by_address: dict[str, list[str]] = {}
        for inc in self._by_transfer.values():
            hold = self.holds.get(inc.transfer_id)
            if inc.peer and hold is not None and hold.state is HoldState.RESERVED:
                by_address.setdefault(inc.peer, []).append(inc.transfer_id)
        return by_address

    async def stop(self) -> None:
        """Shutdown: answer every waiting client and free the adopted sequences' blocks."""
        for inc in list(self._by_transfer.values()):
            if inc.peer:
                self.connector.send(inc.peer, Abort(inc.transfer_id, inc.request_id, self.epoch,
                                                    reason="the decode instance is shutting "
                                                    "down"))
            self._end(inc, ReleaseReason.SHUTDOWN, "the decode instance is shutting down")
        for seq, _ in self.take_adopted():
            self.parts.blocks.free(seq.table)
        await super().stop()

    # -- internals --------------------------------------------------------------------------

    def _on_prefill(self, message: Prefill, sender: str) -> None:
        inc = self._by_transfer.get(message.transfer_id)
        if inc is None:
            inc = self._by_transfer[message.transfer_id] = Incoming(
                message.transfer_id, self.now() + self.settings.first_contact_secs)
        elif inc.prefill is not None:
            return  # a duplicate
        inc.prefill, inc.peer, inc.peer_epoch = message, sender, message.epoch
        if inc.request is not None:
            self._reserve(inc)

    def _reserve(self, inc: Incoming) -> None:
        request, prefill, info = inc.request, inc.prefill, inc.info
        assert request is not None and prefill is not None and info is not None
        protocol = info.transfer_protocol
        if prefill.fingerprint != self.layout.fingerprint():
            self._refuse(inc, "incompatible_layout", "the KV layouts of the prefill and decode "
                         "instances differ (model, dtype, layers, heads, head size or block "
                         "size)")
            return
        if protocol not in self.handles:
            self._refuse(inc, "unsupported_protocol", f"the decode instance does not offer "
                         f"the {protocol} transport (it offers {', '.join(self.handles)})")
            return
        if list(prefill.prompt_token_ids) != list(request.prompt_token_ids):
            self._refuse(inc, "prompt_mismatch", "the prefill and decode instances tokenized "
                         "different prompts")
            return
        table = BlockTable()
        try:
            cached = self.parts.blocks.allocate_prompt(table, request.prompt_token_ids)
        except OutOfBlocks:
            need = self.parts.blocks.blocks_for(request.prompt_len)
            self._refuse(inc, "no_room", f"no room for the prompt's KV cache ({need} blocks, "
                         f"{self.parts.blocks.num_available} available)")
            return
        self.holds.take(inc.transfer_id, request.request_id, HoldSide.DECODE,
                        HoldState.RESERVED, table, self.settings.hold_secs)
        first = cached // self.layout.block_size
        inc.written_blocks = len(table.blocks) - first
        self.connector.send(inc.peer, CacheSync(
            inc.transfer_id, request.request_id, self.epoch, block_ids=table.blocks[first:],
            cached_tokens=cached, handle=self.handles[protocol],
            hold_secs=self.settings.hold_secs))
        log.debug("pd.reserved", transfer_id=inc.transfer_id, request_id=request.request_id,
                  at=time.time())

    def _on_done(self, inc: Incoming, done: Done) -> None:
        hold = self.holds.get(inc.transfer_id)
        request = inc.request
        if hold is None or hold.state is not HoldState.RESERVED or request is None:
            return  # lapsed or aborted meanwhile: the client has had its answer
        table = BlockTable(list(hold.table.blocks), list(hold.table.keys), hold.table.committed)
        hold.table.blocks.clear()  # the sequence owns the references now
        self.holds.release(inc.transfer_id, ReleaseReason.DONE)
        self._forget(inc)
        layout = self.layout
        self.metrics.transferred(info_protocol(inc), "received",
                                 inc.written_blocks * 2 * layout.num_layers * layout.block_bytes,
                                 0.0)
        seq = Seq.from_request(request, self.parts.tokenizer)
        seq.table = table
        seq.num_computed = request.prompt_len
        seq.num_cached_tokens = done.cached_tokens
        seq.admitted_once = True
        seq.direct = True
        seq.tokens.append(done.first_token)
        seq.adopted_at = time.time()
        log.debug("pd.adopted", transfer_id=inc.transfer_id, request_id=request.request_id,
                  at=seq.adopted_at)
        self.parts.blocks.commit(seq.table, seq.tokens, seq.num_computed)
        if self.parts.on_admit is not None:
            self.parts.on_admit(seq)
        reason = self.parts.finish(seq, done.first_token)
        self._adopted.append((seq, seq.output([done.first_token], reason)))

    def _refuse(self, inc: Incoming, reason: str, message: str) -> None:
        log.info("pd.reject", transfer_id=inc.transfer_id, reason=reason)
        if inc.peer:
            self.connector.send(inc.peer, Reject(inc.transfer_id, inc.request_id, self.epoch,
                                                 reason=reason, message=message))
        self._end(inc, ReleaseReason.REJECTED, f"the decode instance refused the request "
                  f"({reason}): {message}")

    def _stop(self, inc: Incoming, why: str) -> None:
        """Abort from this side: quarantine the reservation until P acknowledges."""
        hold = self.holds.get(inc.transfer_id)
        if inc.peer:
            self.connector.send(inc.peer, Abort(inc.transfer_id, inc.request_id, self.epoch,
                                                reason=why))
        if hold is None:
            self._end(inc, ReleaseReason.ABORTED, why)
            return
        self.holds.quarantine(inc.transfer_id, self.settings.quarantine_secs)
        self._answer(inc, why)

    def _end(self, inc: Incoming, reason: ReleaseReason, why: str) -> None:
        """Release the reservation (if any), answer the client (if not yet), forget."""
        if self.holds.get(inc.transfer_id) is not None:
            self.holds.release(inc.transfer_id, reason)
        self._answer(inc, why)
        self._forget(inc)

    def _answer(self, inc: Incoming, why: str) -> None:
        if not inc.answered and inc.request is not None:
            inc.answered = True
            self.output([self.error(inc.request.request_id, inc.request.prompt_len, why)])

    def _forget(self, inc: Incoming) -> None:
        self._by_transfer.pop(inc.transfer_id, None)
        if inc.request is not None:
            self._by_request.pop(inc.request.request_id, None)
