"""The P-D connector's sockets (DESIGN 8.2): one ZeroMQ ROUTER inbox, one DEALER per peer.

Every engine binds a ROUTER on its ``--pd-comm-port``; to talk to a peer it connects a DEALER
to the peer's port, its routing id being this engine's instance id, so the receiver knows who
sent each frame. Frames are :mod:`~fdcore.engine.disagg.messages` (msgpack, never pickle).

Epochs: each engine stamps its frames with the epoch it picked at start. A frame whose epoch is
older than one already seen from the same sender is a restarted peer's leftover and is
dropped; a newer one is reported once (``on_restart``) so the hand-offs of the sender's old
life end at once rather than at their deadlines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog
import zmq
import zmq.asyncio

from fdcore.engine.disagg.messages import Message, MessageError, decode, encode

log = structlog.get_logger(__name__)

# Frames queued for a peer that is not (yet) reachable, at most; more are dropped, and the
# hand-offs they belong to end at their deadlines.
SEND_HWM = 10_000


def new_epoch() -> int:
    """An epoch for this start: later starts get larger ones."""
    return time.time_ns()


class Connector:
    """Sends frames to peers by address and hands each received one to ``on_message``.

    ``on_message(message, sender)`` and ``on_restart(sender, epoch)`` run on the event loop;
    ``sender`` is the peer's instance id.
    """

    def __init__(
        self, *, host: str, port: int, instance_id: str, epoch: int,
        on_message: Callable[[Message, str], None],
        on_restart: Callable[[str, int], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.instance_id = instance_id
        self.epoch = epoch
        self.on_message = on_message
        self.on_restart = on_restart
        self._context: zmq.asyncio.Context | None = None
        self._inbox: zmq.asyncio.Socket | None = None
        self._peers: dict[str, zmq.asyncio.Socket] = {}
        self._epochs: dict[str, int] = {}
        self._reader: asyncio.Task[None] | None = None
        self.dropped = 0  # frames refused: malformed, or from a stale epoch

    async def start(self) -> None:
        """Bind the inbox and start reading it."""
        self._context = zmq.asyncio.Context()
        inbox = self._context.socket(zmq.ROUTER)
        inbox.setsockopt(zmq.LINGER, 0)
        inbox.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer reuses its routing id
        inbox.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)
        try:
            inbox.bind(f"tcp://{self.host}:{self.port}")
        except zmq.ZMQError as exc:
            inbox.close()
            self._context.term()
            self._context = None
            raise OSError(f"the P-D connector cannot listen on {self.host}:{self.port}: "
                          f"{exc}") from None
        self._inbox = inbox
        self._reader = asyncio.create_task(self._read(), name="fdcore-pd-connector")

    async def stop(self) -> None:
        """Close every socket (queued frames are dropped)."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        for socket in [*self._peers.values(), *([self._inbox] if self._inbox else [])]:
            socket.close(linger=0)
        self._peers.clear()
        self._inbox = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def send(self, address: str, message: Message) -> None:
        """Queue ``message`` for the peer at ``address`` (``host:port``); never blocks. A
        frame that cannot be queued is dropped: every step has a deadline behind it."""
        socket = self._peers.get(address)
        if socket is None:
            if self._context is None:
                return
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, SEND_HWM)
            socket.setsockopt(zmq.ROUTING_ID, self.instance_id.encode())
            socket.setsockopt(zmq.RECONNECT_IVL, 100)  # a restarted peer is found again soon
            socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
            socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
            socket.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
            socket.connect(f"tcp://{address}")
            self._peers[address] = socket
        try:
            socket.send(encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("pd.send_dropped", peer=address, type=message.TYPE,
                        transfer_id=message.transfer_id)

    async def _read(self) -> None:
        assert self._inbox is not None
        while True:
            parts = await self._inbox.recv_multipart()
            if len(parts) != 2:
                self.dropped += 1
                continue
            sender = parts[0].decode(errors="replace")
            try:
                message = decode(parts[1])
            except MessageError as exc:
                self.dropped += 1
                log.warning("pd.bad_frame", sender=sender, error=str(exc))
                continue
            if not self._current(sender, message.epoch):
                self.dropped += 1
                continue
            try:
                self.on_message(message, sender)
            except Exception:  # one bad hand-off must not stop the connector
                log.exception("pd.handler_failed", type=message.TYPE,
                              transfer_id=message.transfer_id)

    def _current(self, sender: str, epoch: int) -> bool:
        known = self._epochs.get(sender)
        if known is not None and epoch < known:
            return False
        if known is None or epoch > known:
            self._epochs[sender] = epoch
            if known is not None and self.on_restart is not None:
                self.on_restart(sender, known)
        return True
