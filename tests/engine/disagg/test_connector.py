"""The connector: frames reach the peer by address, stale epochs and garbage are dropped."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from fdcore.engine.disagg.connector import Connector
from fdcore.engine.disagg.messages import Abort, Heartbeat, Message, encode
from fdcore.testing import free_port


class Inbox:
    """Collects what a connector hands over."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[tuple[Message, str]] = asyncio.Queue()
        self.restarts: list[tuple[str, int]] = []

    def on_message(self, message: Message, sender: str) -> None:
        self.messages.put_nowait((message, sender))

    def on_restart(self, sender: str, epoch: int) -> None:
        self.restarts.append((sender, epoch))

    async def next(self) -> tuple[Message, str]:
        async with asyncio.timeout(10):
            return await self.messages.get()


def _connector(port: int, name: str, epoch: int, inbox: Inbox) -> Connector:
    return Connector(host="127.0.0.1", port=port, instance_id=name, epoch=epoch,
                     on_message=inbox.on_message, on_restart=inbox.on_restart)


async def test_frames_go_both_ways_and_name_their_sender() -> None:
    a_in, b_in = Inbox(), Inbox()
    a_port, b_port = free_port(), free_port()
    a = _connector(a_port, f"127.0.0.1:{a_port}", 1, a_in)
    b = _connector(b_port, f"127.0.0.1:{b_port}", 2, b_in)
    await a.start()
    await b.start()
    try:
        a.send(f"127.0.0.1:{b_port}", Abort("t1", "r1", 1, reason="test"))
        message, sender = await b_in.next()
        assert message == Abort("t1", "r1", 1, reason="test")
        assert sender == f"127.0.0.1:{a_port}"
        b.send(sender, Heartbeat("", "", 2, transfer_ids=["t1"]))  # a reply to the sender
        reply, _ = await a_in.next()
        assert reply == Heartbeat("", "", 2, transfer_ids=["t1"])
    finally:
        await a.stop()
        await b.stop()


async def test_stale_epochs_and_bad_frames_are_dropped() -> None:
    inbox = Inbox()
    port = free_port()
    receiver = _connector(port, "receiver", 1, inbox)
    await receiver.start()
    context = zmq.asyncio.Context()
    peer = context.socket(zmq.DEALER)
    peer.setsockopt(zmq.ROUTING_ID, b"peer")
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(f"tcp://127.0.0.1:{port}")
    try:
        await peer.send(encode(Abort("t", "r", 5)))
        assert (await inbox.next())[0].epoch == 5
        await peer.send(b"\x93garbage")  # not a frame
        await peer.send(encode(Abort("t", "r", 4)))  # the peer's previous life
        await peer.send(encode(Abort("t", "r", 6)))  # the peer restarted
        message, sender = await inbox.next()
        assert message.epoch == 6 and sender == "peer"
        assert inbox.restarts == [("peer", 5)]
        assert receiver.dropped == 2
    finally:
        peer.close()
        context.term()
        await receiver.stop()


async def test_a_port_in_use_is_a_clear_error() -> None:
    inbox = Inbox()
    port = free_port()
    first = _connector(port, "a", 1, inbox)
    await first.start()
    try:
        with pytest.raises(OSError, match="cannot listen"):
            await _connector(port, "b", 1, inbox).start()
    finally:
        await first.stop()
