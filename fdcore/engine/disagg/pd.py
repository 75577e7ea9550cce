"""The P-D hand-off as one engine part: connector, holds, transports, and this role's side.

:class:`PD` is what the engine loop talks to. On a prefill engine it announces admitted
requests to D and hands off their KV after the first token; on a decode engine it takes
requests over from P. One sweeper task sends heartbeats and ends what passed its deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

import structlog
from prometheus_client import CollectorRegistry

from fdcore.engine.block_manager import BlockManager
from fdcore.engine.disagg.connector import Connector, new_epoch
from fdcore.engine.disagg.decode import DecodeSide
from fdcore.engine.disagg.holds import Holds, HoldState
from fdcore.engine.disagg.info import disagg_of
from fdcore.engine.disagg.messages import Heartbeat, Message
from fdcore.engine.disagg.metrics import DisaggMetrics
from fdcore.engine.disagg.prefill import PrefillSide
from fdcore.engine.disagg.side import EngineParts, PDSettings, Pulse
from fdcore.engine.sequence import Seq
from fdcore.errors import StartupError
from fdcore.kv import KVLayout
from fdcore.tasks import cancel_and_wait
from fdcore.types import EngineRequest, RequestOutput, Role, Transport

log = structlog.get_logger(__name__)


class PD:
    """One engine's P-D hand-offs (``--splitwise-role prefill`` or ``decode``)."""

    def __init__(
        self, *, role: Role, settings: PDSettings, host: str, port: int, advertise: str,
        layout: KVLayout, transports: Mapping[str, Transport], blocks: BlockManager,
        registry: CollectorRegistry,
    ) -> None:
        if role is Role.MIXED:
            raise ValueError("a mixed engine hands nothing off")
        self.role = role
        self.settings = settings
        self.layout = layout
        self.transports = dict(transports)
        for transport in self.transports.values():
            transport.context.accept_write = self.accepts_write  # type: ignore[attr-defined]
        self.holds = Holds(blocks)
        self.metrics = DisaggMetrics(registry, self.holds)
        self.pulse = Pulse(settings.hold_secs)
        self.connector = Connector(host=host, port=port, instance_id=advertise,
                                   epoch=new_epoch(), on_message=self._on_message,
                                   on_restart=self._on_restart)
        self.side: PrefillSide | DecodeSide | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def bind(self, parts: EngineParts) -> None:
        """Wire the engine's parts in (the engine loop exists only after this object)."""
        cls = PrefillSide if self.role is Role.PREFILL else DecodeSide
        self.side = cls(settings=self.settings, parts=parts, connector=self.connector,
                        holds=self.holds, metrics=self.metrics, layout=self.layout,
                        transports=self.transports, pulse=self.pulse)

    @property
    def prefill(self) -> PrefillSide | None:
        """The prefill side, on a prefill engine."""
        return self.side if isinstance(self.side, PrefillSide) else None

    @property
    def decode(self) -> DecodeSide | None:
        """The decode side, on a decode engine."""
        return self.side if isinstance(self.side, DecodeSide) else None

    async def start(self) -> None:
        """Start the transports, expose D's pool, open the connector, start sweeping."""
        assert self.side is not None, "bind() first"
        started: list[Transport] = []
        try:
            for transport in self.transports.values():
                await transport.start()
                started.append(transport)
            if self.decode is not None:
                self.decode.handles = {name: await t.expose()
                                       for name, t in self.transports.items()}
            await self.connector.start()
        except BaseException as exc:
            for transport in reversed(started):
                await transport.stop()
            if isinstance(exc, OSError):
                raise StartupError(f"--pd-comm-port: {exc}") from None
            raise
        self._sweeper = asyncio.create_task(self._sweep(), name="fdcore-pd-sweeper")
        log.info("pd.started", role=self.role.value, port=self.connector.port,
                 transports=list(self.transports), epoch=self.connector.epoch)

    async def stop(self) -> None:
        """End every hand-off (peers are told), then close the connector and transports."""
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        if self.side is not None:
            await self.side.stop()
        await asyncio.sleep(0)  # let the last frames reach the sockets
        await self.connector.stop()
        for transport in reversed(list(self.transports.values())):
            await transport.stop()

    def accepts_write(self, transfer_id: str, block_ids: Sequence[int]) -> bool:
        """Whether ``block_ids`` are reserved for ``transfer_id`` right now (a receiver that
        lands the bytes itself asks; anything else is discarded)."""
        hold = self.holds.get(transfer_id)
        return (hold is not None and hold.state is HoldState.RESERVED
                and set(block_ids) <= set(hold.table.blocks))

    # -- the engine loop's view -------------------------------------------------------------

    def busy(self) -> bool:
        """Whether a hand-off is in flight (the idle loop then looks again soon)."""
        return bool(self.side is not None and len(self.side))

    def knows(self, request_id: str) -> bool:
        """Whether ``request_id`` is in a hand-off here (so an abort must reach it)."""
        return self.side is not None and self.side.knows(request_id)

    def takes(self, request: EngineRequest) -> bool:
        """On D: take over ``request`` when it has ``disaggregate_info`` (its outputs then go
        straight to the API, never through the scheduler)."""
        info = disagg_of(request.extra) if self.decode is not None else None
        if self.decode is None or info is None:
            return False
        self.decode.expect(request, info)
        return True

    def on_admitted(self, seq: Seq) -> None:
        """On P: a request with ``disaggregate_info`` was admitted."""
        if self.prefill is not None and seq.disagg is not None:
            self.prefill.on_admitted(seq)

    def hands_off(self, seq: Seq, token: int, reason: str | None) -> bool:
        """On P: the first token was sampled; whether the hand-off took the sequence."""
        if self.prefill is None or seq.disagg is None:
            return False
        self.prefill.hand_off(seq, token, reason)
        return True

    def on_removed(self, seq: Seq) -> None:
        """A sequence left the batch (finished, aborted, failed)."""
        if self.prefill is not None and seq.disagg is not None:
            self.prefill.on_removed(seq.request_id)

    def abort(self, request_id: str, why: str = "aborted") -> None:
        """Abort ``request_id``'s hand-off, if it has one."""
        if self.side is not None:
            self.side.abort(request_id, why)

    def on_step(self, seqs: Sequence[Seq]) -> None:
        """A forward pass is about to run ``seqs``: note adopted ones' first decode step."""
        for seq in seqs:
            if seq.adopted_at:
                log.debug("pd.first_decode", request_id=seq.request_id, at=time.time(),
                          after=round(time.time() - seq.adopted_at, 6))
                seq.adopted_at = 0.0

    def take_adopted(self) -> list[tuple[Seq, RequestOutput]]:
        """On D: sequences ready to decode, with their first output."""
        return self.decode.take_adopted() if self.decode is not None else []

    # -- internals --------------------------------------------------------------------------

    def _on_message(self, message: Message, sender: str) -> None:
        if self.side is not None:
            self.side.on_message(message, sender)

    def _on_restart(self, sender: str, old_epoch: int) -> None:
        log.info("pd.peer_restarted", peer=sender)
        if self.side is not None:
            self.side.on_restart(sender, old_epoch)

    async def _sweep(self) -> None:
        assert self.side is not None
        interval = self.settings.heartbeat_secs
        while True:
            self.pulse.tick()
            try:
                self.side.expire()
                for address, ids in self.side.heartbeats().items():
                    self.connector.send(address, Heartbeat("", "", self.connector.epoch,
                                                           transfer_ids=ids))
            except Exception:  # keep sweeping: a deadline missed here would strand blocks
                log.exception("pd.sweep_failed")
            await asyncio.sleep(interval)
