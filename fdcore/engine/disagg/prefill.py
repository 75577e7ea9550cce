"""P's end of a hand-off: announce the prompt to D, prefill, write D's blocks, say ``done``.

A P request's life (DESIGN 8.2): when the engine admits it, ``prefill`` goes to D; D answers
``cache_sync`` (where to write, how many tokens it already has, its transport handle) or
``reject``. When the prefill samples the first token the sequence leaves the batch with its
blocks pinned by a SENDING hold; P writes the blocks D lacks, sends ``done`` with the first
token, releases the hold (the blocks stay in P's prefix cache) and answers its own client with
that one token (``finish_reason: length``, as a prefill-only request ends). Any failure sends
``fail`` to D and answers P's client ``PD Error: ...``; an abort from either side stops the
hand-off and sends ``abort`` (or, answering D's, ``abort_ack``) once no write is in flight.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import structlog

from fdcore.engine.block_manager import BlockTable
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
from fdcore.types import TransportLink

log = structlog.get_logger(__name__)

MAX_LINKS = 32  # open transport links kept for reuse (one per D pool)


@dataclass(slots=True, eq=False)
class Outgoing:
    """One request P hands to D."""

    transfer_id: str
    request_id: str
    info: DisaggInfo
    seq: Seq
    answer: asyncio.Future[Message] = field(default_factory=asyncio.Future)
    peer: str = ""  # D's connector (its frames' sender), from its first answer
    peer_epoch: int = 0
    contact: float = 0.0  # when D last said it holds the reservation (cache_sync, heartbeat)
    pulse: int = 0  # the pulse epoch of that contact
    task: asyncio.Task[Any] | None = None
    writing: bool = False
    aborted: str = ""  # why, once aborted (the task then stops at its next step)
    ack_abort: bool = False  # the abort came from D: answer abort_ack, not abort

    @property
    def address(self) -> str:
        """Where frames for D go: its own connector once it answered, else the router's."""
        return self.peer or self.info.decode_address


class PrefillSide(Side):
    """Every hand-off this P engine has in flight, by transfer id."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._by_transfer: dict[str, Outgoing] = {}
        self._by_request: dict[str, Outgoing] = {}
        self._links: OrderedDict[str, TransportLink] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_transfer)

    def knows(self, request_id: str) -> bool:
        """Whether ``request_id`` is being handed off from here."""
        return request_id in self._by_request

    # -- the engine loop's calls ------------------------------------------------------------

    def on_admitted(self, seq: Seq) -> None:
        """``seq`` (with ``disaggregate_info``) was admitted: tell D about its prompt."""
        info = seq.disagg
        assert info is not None
        tid = info.transfer(seq.request_id)
        if tid in self._by_transfer or seq.request_id in self._by_request:
            return
        out = Outgoing(tid, seq.request_id, info, seq)
        self._by_transfer[tid] = out
        self._by_request[seq.request_id] = out
        log.debug("pd.admitted", transfer_id=tid, request_id=seq.request_id, at=time.time())
        sampling = seq.request.sampling
        self.connector.send(out.address, Prefill(
            tid, seq.request_id, self.epoch, prompt_token_ids=list(seq.request.prompt_token_ids),
            sampling={"max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
                      "top_p": sampling.top_p, "top_k": sampling.top_k},
            protocol=info.transfer_protocol, fingerprint=self.layout.fingerprint()))

    def hand_off(self, seq: Seq, token: int, reason: str | None) -> None:
        """The prefill sampled ``token``: pin the blocks and send them (in the background)."""
        out = self._by_request.get(seq.request_id)
        self.parts.batcher.detach(seq)
        table, seq.table = seq.table, BlockTable()
        if out is None:  # forgotten meanwhile: nothing to send
            self.parts.blocks.free(table)
            return
        self.holds.take(out.transfer_id, out.request_id, HoldSide.PREFILL, HoldState.SENDING,
                        table, self.settings.first_contact_secs)
        log.debug("pd.prefilled", transfer_id=out.transfer_id, request_id=out.request_id,
                  at=time.time())
        out.task = self.spawn(self._send(out, token, reason), f"fdcore-pd-send-{out.transfer_id}")

    def on_removed(self, request_id: str) -> None:
        """The sequence left the batch without a hand-off (aborted, failed): tell D."""
        out = self._by_request.get(request_id)
        if out is not None and out.task is None:
            self._abort(out, "the prefill request ended before its hand-off", notify=False)

    def abort(self, request_id: str, why: str) -> None:
        """Abort by request id (the router's abort, P's client gone)."""
        out = self._by_request.get(request_id)
        if out is not None:
            self._abort(out, why, notify=False)

    # -- frames from D ----------------------------------------------------------------------

    def on_message(self, message: Message, sender: str) -> None:
        """A frame from a D engine."""
        if isinstance(message, Heartbeat):
            self._heard(message.transfer_ids, sender)
            return
        out = self._by_transfer.get(message.transfer_id)
        if out is None:
            if isinstance(message, CacheSync):  # D holds blocks for something gone: free them
                self.connector.send(sender, Abort(message.transfer_id, message.request_id,
                                                  self.epoch, reason="unknown transfer"))
            return
        if out.peer and (sender != out.peer or message.epoch != out.peer_epoch):
            return  # another instance, or D's previous life
        if not out.peer:
            out.peer, out.peer_epoch = sender, message.epoch
        if isinstance(message, (CacheSync, Reject, Fail)) and not out.answer.done():
            if isinstance(message, CacheSync):
                self._heard([out.transfer_id], sender)
            out.answer.set_result(message)
        elif isinstance(message, Abort):
            out.ack_abort = True
            self._abort(out, message.reason or "aborted by the decode instance")

    def on_restart(self, sender: str, old_epoch: int) -> None:
        """A D engine restarted: its reservations from before are gone."""
        for out in list(self._by_transfer.values()):
            if out.peer == sender and out.peer_epoch <= old_epoch:
                self._abort(out, "the decode instance restarted")

    def expire(self) -> None:
        """End hand-offs whose pinned blocks outlived their deadline (D went quiet)."""
        for hold in self.holds.due(HoldSide.PREFILL):
            out = self._by_transfer.get(hold.transfer_id)
            if out is None:
                self.holds.release(hold.transfer_id, ReleaseReason.EXPIRED)
            elif not out.writing:
                self._abort(out, "the decode instance stopped answering",
                            reason=ReleaseReason.EXPIRED)

    def heartbeats(self) -> dict[str, list[str]]:
        """Transfer ids still wanted, by D address (the heartbeat's content)."""
        by_address: dict[str, list[str]] = {}
        for out in self._by_transfer.values():
            by_address.setdefault(out.address, []).append(out.transfer_id)
        return by_address

    async def stop(self) -> None:
        """Abort every hand-off (shutdown), then close links."""
        for out in list(self._by_transfer.values()):
            self._abort(out, "the prefill instance is shutting down",
                        reason=ReleaseReason.SHUTDOWN)
        await super().stop()
        for link in self._links.values():
            await link.close()
        self._links.clear()

    # -- internals --------------------------------------------------------------------------

    def _heard(self, transfer_ids: list[str], sender: str) -> None:
        if self.pulse.stale():
            return  # read after a pause: it says nothing about D now
        for tid in transfer_ids:
            out = self._by_transfer.get(tid)
            if out is not None and out.peer == sender:
                out.contact, out.pulse = self.now(), self.pulse.epoch
                self.holds.renew(tid, self.settings.hold_secs)

    async def _send(self, out: Outgoing, token: int, reason: str | None) -> None:
        seq = out.seq
        try:
            try:
                async with asyncio.timeout(self.settings.first_contact_secs):
                    answer = await out.answer
            except TimeoutError:
                raise _HandOffError("the decode instance did not answer within "
                                    f"{self.settings.first_contact_secs:g} s") from None
            if isinstance(answer, Reject):
                raise _HandOffError(f"the decode instance refused the request "
                                    f"({answer.reason}): {answer.message}", tell_peer=False)
            if isinstance(answer, Fail):
                raise _HandOffError(f"the decode instance failed: {answer.message}",
                                    tell_peer=False)
            assert isinstance(answer, CacheSync)
            await self._write(out, answer)
        except _HandOffError as exc:
            self._fail(out, str(exc), tell_peer=exc.tell_peer)
            return
        except Exception as exc:  # a transport failure or timeout
            log.warning("pd.write_failed", transfer_id=out.transfer_id, error=repr(exc))
            self._fail(out, f"KV transfer failed: {exc!r}", tell_peer=True)
            return
        if out.aborted:  # an abort arrived while the write was in flight
            self._finish_abort(out, ReleaseReason.ABORTED, notify=True)
            return
        self.connector.send(out.address, Done(
            out.transfer_id, out.request_id, self.epoch, first_token=token,
            cached_tokens=seq.num_cached_tokens, prompt_tokens=seq.prompt_len))
        self._drop(out, ReleaseReason.DONE)
        self.output([seq.output([token], reason or "length")])

    async def _write(self, out: Outgoing, sync: CacheSync) -> None:
        hold = self.holds.get(out.transfer_id)
        if hold is None:
            raise _HandOffError("the hand-off ended before its blocks were sent")
        size = self.layout.block_size
        first = sync.cached_tokens // size
        src = hold.table.blocks[first:self.parts.blocks.blocks_for(out.seq.prompt_len)]
        if sync.cached_tokens % size or len(src) != len(sync.block_ids):
            raise _HandOffError(f"the decode instance offered {len(sync.block_ids)} blocks "
                                f"after {sync.cached_tokens} cached tokens; the prompt needs "
                                f"{len(src)}")
        protocol = out.info.transfer_protocol
        if protocol not in self.transports:
            raise _HandOffError(f"this prefill instance does not offer the {protocol} "
                                "transport")
        if not src:
            return
        # D keeps the reservation while it hears from us, and lets it go (after a quarantine)
        # once it has not for hold_secs: a write may start only while D's word is fresh.
        if (self.pulse.stale() or out.pulse != self.pulse.epoch
                or self.now() - out.contact > self.settings.hold_secs):
            raise _HandOffError("the decode instance's reservation lapsed")
        link = await self._link(protocol, sync.handle)
        started = self.now()
        out.writing = True
        try:
            async with asyncio.timeout(self.settings.hold_secs):
                nbytes = await link.write(src, sync.block_ids, transfer_id=out.transfer_id)
        except BaseException:
            self._close_link(protocol, sync.handle)
            raise
        finally:
            out.writing = False
        self.metrics.transferred(protocol, "sent", nbytes, self.now() - started)

    async def _link(self, protocol: str, handle: dict[str, Any]) -> TransportLink:
        key = _handle_key(protocol, handle)
        link = self._links.get(key)
        if link is None:
            link = await self.transports[protocol].connect(handle)
            self._links[key] = link
            while len(self._links) > MAX_LINKS:
                _, old = self._links.popitem(last=False)
                self.spawn(old.close(), "fdcore-pd-link-close")
        self._links.move_to_end(key)
        return link

    def _close_link(self, protocol: str, handle: dict[str, Any]) -> None:
        link = self._links.pop(_handle_key(protocol, handle), None)
        if link is not None:
            self.spawn(link.close(), "fdcore-pd-link-close")

    def _fail(self, out: Outgoing, message: str, *, tell_peer: bool) -> None:
        if tell_peer:
            self.connector.send(out.address, Fail(out.transfer_id, out.request_id, self.epoch,
                                                  reason="prefill_failed", message=message))
        if self._drop(out, ReleaseReason.FAILED):
            self.output([self.error(out.request_id, out.seq.prompt_len, message)])

    def _abort(self, out: Outgoing, why: str, *, notify: bool = True,
               reason: ReleaseReason = ReleaseReason.ABORTED) -> None:
        """Stop ``out``. ``notify``: P's client still waits and is told (not when the abort
        came through P's own API, which answers its client itself)."""
        if out.aborted:
            return
        out.aborted = why
        if out.task is None:  # still prefilling: the engine loop takes it out of the batch
            self.parts.abort(out.request_id)
        elif not out.writing:
            out.task.cancel()
        if not out.writing:
            self._finish_abort(out, reason, notify)
        # else: the write finishes first (into blocks D still quarantines), then the task
        # calls _finish_abort.

    def _finish_abort(self, out: Outgoing, reason: ReleaseReason, notify: bool) -> None:
        if out.ack_abort:
            self.connector.send(out.address, AbortAck(out.transfer_id, out.request_id,
                                                      self.epoch))
        else:
            self.connector.send(out.address, Abort(out.transfer_id, out.request_id, self.epoch,
                                                   reason=out.aborted))
        if self._drop(out, reason) and notify:
            self.output([self.error(out.request_id, out.seq.prompt_len, out.aborted)])

    def _drop(self, out: Outgoing, reason: ReleaseReason) -> bool:
        """Forget ``out`` and release its hold; whether this call did it."""
        if self._by_transfer.pop(out.transfer_id, None) is None:
            return False
        self._by_request.pop(out.request_id, None)
        self.holds.release(out.transfer_id, reason)
        return True


def _handle_key(protocol: str, handle: dict[str, Any]) -> str:
    return protocol + "|" + json.dumps(handle, sort_keys=True, default=repr)


class _HandOffError(Exception):
    def __init__(self, message: str, *, tell_peer: bool = True) -> None:
        super().__init__(message)
        self.tell_peer = tell_peer
