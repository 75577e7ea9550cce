"""The ``tcp`` transport: writes land in exactly the destination blocks (in this process and in
a receiver of its own), a refused write lands nothing, a broken or silent peer is an error and
never a hang, garbage never takes the server down, stop releases the port once, and the staged
window a device pool goes through."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgpack
import pytest
import structlog
import torch
from fdcore_plugins.transports import tcp
from fdcore_plugins.transports.pool_access import PoolWindow, layout_dict, plan_groups
from pydantic import ValidationError

from fdcore.kv import KVLayout, plan_copies
from fdcore.registry import Registry
from fdcore.types import TransportContext
from tests.plugins.transports.peer import Peer, build, digest, landed, write_cases

LAYOUT = KVLayout(num_layers=3, num_blocks=16, kv_heads=2, block_size=4, head_dim=8, model="m")
CASES = write_cases(LAYOUT)
DEADLINE = 60.0  # no test waits longer for anything: a hang fails instead


def filled(transport: Any) -> Any:
    transport.context.pool.copy_(torch.randn(transport.context.layout.shape))
    return transport


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Any, Any]]:
    sender, receiver = filled(build("tcp", LAYOUT, "cpu")), filled(build("tcp", LAYOUT, "cpu"))
    for transport in (sender, receiver):
        await transport.start()
    yield sender, receiver
    for transport in (sender, receiver):
        await transport.stop()


async def within(work: Any) -> Any:
    return await asyncio.wait_for(work, DEADLINE)


@pytest.mark.parametrize(("src", "dst", "layers"), CASES)
async def test_a_write_lands_in_exactly_the_destination_blocks(
    pair: tuple[Any, Any], src: list[int], dst: list[int], layers: list[int] | None,
) -> None:
    sender, receiver = pair
    before = receiver.context.pool.clone()
    link = await sender.connect(await receiver.expose())
    moved = await within(link.write(src, dst, layers, transfer_id="t-1"))
    chosen = LAYOUT.num_layers if layers is None else len(layers)
    assert moved == len(src) * chosen * 2 * LAYOUT.block_bytes
    assert torch.equal(receiver.context.pool, landed(before, sender.context.pool, src, dst,
                                                     layers))
    await link.close()


async def test_a_receiver_in_another_process_gets_exactly_the_blocks() -> None:
    sender = filled(build("tcp", LAYOUT, "cpu"))
    await sender.start()
    async with Peer("tcp", LAYOUT) as peer:
        link = await sender.connect(peer.handle)
        expected = torch.zeros(LAYOUT.shape)
        for src, dst, layers in CASES:
            await within(link.write(src, dst, layers))
            expected = landed(expected, sender.context.pool, src, dst, layers)
            assert await peer.ask("hash") == digest(expected)
        await link.close()
    await sender.stop()


async def test_writes_at_once_on_one_link_take_turns(pair: tuple[Any, Any]) -> None:
    sender, receiver = pair
    link = await sender.connect(await receiver.expose())
    await within(asyncio.gather(*(link.write([b], [15 - b]) for b in range(8))))
    assert torch.equal(receiver.context.pool[:, :, 8:], sender.context.pool[:, :, :8].flip(2))


async def test_closing_a_link_under_writes_lets_them_finish_first(pair: tuple[Any, Any]) -> None:
    # A failed hand-off closes its link while other hand-offs to the same receiver are still
    # writing on it: their socket must stay open (and registered) until they are done, or its
    # descriptor is reused by another connection that their clean-up then unregisters.
    sender, receiver = pair
    link = await sender.connect(await receiver.expose())
    writes = [asyncio.ensure_future(link.write([b], [15 - b])) for b in range(8)]
    await asyncio.sleep(0)  # the first write holds the link and waits on its socket
    await within(link.close())
    results = await within(asyncio.gather(*writes, return_exceptions=True))
    assert results[0] == 3 * 2 * LAYOUT.block_bytes  # the write under way finished
    assert all(isinstance(r, ConnectionError) and "closed" in str(r) for r in results[1:])
    assert link._sock is None
    with pytest.raises(ConnectionError, match="closed"):
        await link.write([0], [0])


async def test_a_refused_write_lands_nothing_and_the_sender_is_told(
    pair: tuple[Any, Any],
) -> None:
    sender, receiver = pair
    asked: list[tuple[str, list[int]]] = []

    def accept_write(transfer_id: str, dst_block_ids: Sequence[int]) -> bool:
        asked.append((transfer_id, list(dst_block_ids)))
        return transfer_id == "mine"

    receiver.context.accept_write = accept_write
    before = receiver.context.pool.clone()
    link = await sender.connect(await receiver.expose())
    with pytest.raises(RuntimeError, match=r"refused the write: blocks \[4, 9\] are not "
                                           r"reserved for transfer 'late'"):
        await within(link.write([0, 1], [4, 9], transfer_id="late"))
    assert asked == [("late", [4, 9])]
    assert torch.equal(receiver.context.pool, before)
    await within(link.write([0, 1], [4, 9], [2], transfer_id="mine"))  # the link still works
    assert torch.equal(receiver.context.pool, landed(before, sender.context.pool, [0, 1],
                                                     [4, 9], [2]))


async def test_a_write_the_plan_refuses_raises_before_sending(pair: tuple[Any, Any]) -> None:
    sender, receiver = pair
    link = await sender.connect(await receiver.expose())
    with pytest.raises(ValueError, match=r"layer 3 outside 0\.\.2"):
        await link.write([0], [1], [3])


async def test_a_layout_that_differs_is_refused_at_connect(pair: tuple[Any, Any]) -> None:
    sender, receiver = pair
    handle = await receiver.expose()
    with pytest.raises(ValueError, match="tcp: KV layouts differ: kv_heads 2 here, 4 there"):
        await sender.connect({**handle, "layout": {**handle["layout"], "kv_heads": 4}})
    with pytest.raises(ValueError, match="needs a host and a port"):
        await sender.connect({**handle, "port": "80"})


class FakeReceiver:
    """A listener that reads ``take`` bytes of each connection, then closes it (``take`` None:
    reads everything and never answers)."""

    def __init__(self, take: int | None) -> None:
        self.take = take
        self.quiet = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.take is None:
            await self.quiet.wait()
        else:
            await reader.readexactly(self.take)
        writer.close()
        await writer.wait_closed()

    async def handle(self) -> dict[str, Any]:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return {"host": "127.0.0.1", "port": port, "layout": layout_dict(BIG)}

    async def close(self) -> None:
        self.quiet.set()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


BIG = KVLayout(num_layers=4, num_blocks=64, kv_heads=8, block_size=16, head_dim=64)  # 16 MiB


async def test_a_peer_closing_mid_write_is_an_error_not_a_hang() -> None:
    sender = build("tcp", BIG, "cpu")
    fake = FakeReceiver(take=1000)
    link = await sender.connect(await fake.handle())
    with pytest.raises(ConnectionError):
        await within(link.write(list(range(64)), list(range(64))))
    await link.close()
    await fake.close()


async def test_a_peer_that_never_answers_times_out() -> None:
    sender = tcp.TcpTransport(tcp.TcpConfig(timeout_secs=0.05),
                              TransportContext(BIG, pool=torch.zeros(BIG.shape)))
    fake = FakeReceiver(take=None)
    link = await sender.connect(await fake.handle())
    with pytest.raises(TimeoutError, match=r"did not complete within 0.05s"):
        await within(link.write([0], [0]))
    await fake.close()


async def test_a_receiver_that_is_gone_is_a_connection_error(pair: tuple[Any, Any]) -> None:
    sender, receiver = pair
    handle = await receiver.expose()
    link = await sender.connect(handle)
    await receiver.stop()
    with pytest.raises(ConnectionError):
        await within(link.write([0], [0]))
    with pytest.raises(ConnectionError, match=r"cannot connect to the receiver at 127\.0\.0\.1"):
        await sender.connect(handle)


def frame(header: Any, *, magic: bytes = tcp.MAGIC, version: int = tcp.VERSION) -> bytes:
    body = header if isinstance(header, bytes) else msgpack.packb(header)
    return tcp.FRAME.pack(magic, version, len(body)) + body


GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    frame({"tid": "t"}, magic=b"NOPE"),
    frame({"tid": "t"}, version=9),
    tcp.FRAME.pack(tcp.MAGIC, tcp.VERSION, tcp.MAX_HEADER + 1),
    frame(b"\xc1\xc1\xc1"),
    frame([1, 2, 3]),
    frame({"tid": 5, "blocks": [0], "layers": None, "nbytes": 0}),
    frame({"tid": "t", "blocks": ["0"], "layers": None, "nbytes": 0}),
    frame({"tid": "t", "blocks": [0], "layers": None, "nbytes": -1}),
    frame({"tid": "t", "blocks": [0], "layers": None, "nbytes": LAYOUT.pool_bytes + 1}),
]


async def closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the server closed the connection (a reset: it did with our bytes unread); our
    end is closed afterwards."""
    try:
        eof = await reader.read() == b""
    except ConnectionResetError:
        eof = True
    writer.close()
    with contextlib.suppress(ConnectionResetError):
        await writer.wait_closed()
    return eof


@pytest.mark.parametrize("garbage", GARBAGE)
async def test_garbage_closes_that_connection_only_and_is_logged(
    pair: tuple[Any, Any], garbage: bytes,
) -> None:
    sender, receiver = pair
    handle = await receiver.expose()
    with structlog.testing.capture_logs() as logs:
        reader, writer = await asyncio.open_connection(handle["host"], handle["port"])
        writer.write(garbage)
        await writer.drain()
        assert await within(closed(reader, writer))
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "tcp_kv.connection_closed"]
    link = await sender.connect(handle)
    await within(link.write([1], [2]))
    assert torch.equal(receiver.context.pool[:, :, 2], sender.context.pool[:, :, 1])


async def test_a_header_naming_blocks_outside_the_pool_is_answered_with_an_error(
    pair: tuple[Any, Any],
) -> None:
    _, receiver = pair
    handle = await receiver.expose()
    before = receiver.context.pool.clone()
    reader, writer = await asyncio.open_connection(handle["host"], handle["port"])
    for blocks, nbytes, message in (([99], 0, "destination block 99 outside 0..15"),
                                    ([1], 7, "7 bytes announced for 1 blocks")):
        writer.write(frame({"tid": "t", "blocks": blocks, "layers": None, "nbytes": nbytes})
                     + b"x" * nbytes)
        ok, landed_bytes, length = tcp.ANSWER.unpack(await within(
            reader.readexactly(tcp.ANSWER.size)))
        assert (ok, landed_bytes) == (0, 0)
        assert (await reader.readexactly(length)).decode() == message
    writer.close()
    await writer.wait_closed()
    assert torch.equal(receiver.context.pool, before)


async def test_stop_is_idempotent_and_frees_the_port(pair: tuple[Any, Any]) -> None:
    sender, receiver = pair
    port = receiver.port
    link = await receiver.connect(await sender.expose())
    await receiver.stop()
    await receiver.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    with pytest.raises(RuntimeError, match="not started"):
        await receiver.expose()
    with socket.create_server(("127.0.0.1", port)):  # bindable again
        pass
    assert link not in receiver.links


async def test_listens_on_the_configured_address_and_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver = tcp.TcpTransport(tcp.TcpConfig(host="127.0.0.1", port=port),
                                TransportContext(LAYOUT, host="10.9.9.9",
                                                 pool=torch.zeros(LAYOUT.shape)))
    await receiver.start()
    handle = await receiver.expose()
    assert (handle["host"], handle["port"]) == ("127.0.0.1", port)
    assert msgpack.unpackb(msgpack.packb(handle)) == handle
    with pytest.raises(OSError, match=f"tcp: cannot listen on 127.0.0.1:{port}"):
        await tcp.TcpTransport(tcp.TcpConfig(host="127.0.0.1", port=port),
                               TransportContext(LAYOUT)).start()
    await receiver.stop()


async def test_a_wildcard_listener_advertises_the_engines_host() -> None:
    receiver = tcp.TcpTransport(tcp.TcpConfig(host="0.0.0.0"),
                                TransportContext(LAYOUT, host="127.0.0.1",
                                                 pool=torch.zeros(LAYOUT.shape)))
    await receiver.start()
    assert (await receiver.expose())["host"] == "127.0.0.1"
    await receiver.stop()


def test_config_keys_defaults_and_strictness() -> None:
    config = tcp.TcpConfig()
    assert (config.host, config.port, config.timeout_secs) == ("", 0, 30.0)
    assert tcp.TcpConfig.model_validate({"timeout-secs": 2, "port": 9000}).port == 9000
    for bad in ({"port": 70000}, {"timeout-secs": 0}, {"stage": 1}):
        with pytest.raises(ValidationError):
            tcp.TcpConfig.model_validate(bad)


def test_the_plugin_registers_tcp() -> None:
    registry = Registry()
    tcp.fdcore_register_transports(registry.register_for("tcp"))
    assert registry.get("transport", "tcp").cls is tcp.TcpTransport


@pytest.mark.parametrize("group_bytes", [1, 2 * 16 * LAYOUT.block_bytes, 1 << 30])
def test_groups_make_up_the_plan_in_its_order(group_bytes: int) -> None:
    for src, dst, layers in CASES:
        nbytes, groups = plan_groups(LAYOUT, LAYOUT, src, dst, layers, group_bytes)
        flat = [c for group in groups for c in group]
        assert flat == plan_copies(LAYOUT, LAYOUT, src, dst, layers)
        assert nbytes == sum(c.nbytes for c in flat)


def test_groups_refuse_what_the_plan_refuses_before_any_group() -> None:
    for src, dst, layers, message in (([0], [16], None, "destination block 16"),
                                      ([0], [1], [0, 5], "layer 5 outside"),
                                      ([0, 1], [1], None, "2 source blocks for 1")):
        with pytest.raises(ValueError, match=message):
            plan_groups(LAYOUT, LAYOUT, src, dst, layers)


# --- the staged window a device pool goes through (exercised here on a host pool) ----------


def test_a_staged_window_splits_ranges_to_fit_its_buffer() -> None:
    window = PoolWindow(torch.zeros(64, dtype=torch.uint8), TransportContext(None), staged=True,
                        stage_bytes=10)
    assert window.chunks([(0, 4), (20, 13), (40, 3)]) == [
        [(0, 4), (20, 6)], [(26, 7), (40, 3)]]
    unstaged = PoolWindow(torch.zeros(64, dtype=torch.uint8), TransportContext(None),
                          staged=False)
    assert unstaged.chunks([(0, 4), (20, 13)]) == [[(0, 4), (20, 13)]]


async def test_a_staged_window_gathers_and_scatters_through_its_buffer() -> None:
    src = torch.arange(64, dtype=torch.uint8)
    dst = torch.zeros(64, dtype=torch.uint8)
    ranges = [(3, 5), (40, 9), (20, 2)]
    sending = PoolWindow(src, TransportContext(None), staged=True, stage_bytes=8)
    receiving = PoolWindow(dst, TransportContext(None), staged=True, stage_bytes=8)
    for chunk in sending.chunks(ranges):
        data = b"".join(bytes(v) for v in await sending.read(chunk))
        assert data == b"".join(bytes(src[o:o + n].numpy()) for o, n in chunk)
        views = receiving.landing(chunk)
        views[0][:] = data
        await receiving.land(chunk)
    expected = torch.zeros(64, dtype=torch.uint8)
    for offset, nbytes in ranges:
        expected[offset:offset + nbytes] = src[offset:offset + nbytes]
    assert torch.equal(dst, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
async def test_cuda_pools_are_staged_through_host_memory() -> None:
    sender = build("tcp", LAYOUT, "cuda")
    sender.context.pool.copy_(torch.randn(LAYOUT.shape, device="cuda"))
    await sender.start()
    async with Peer("tcp", LAYOUT, device="cuda") as peer:
        link = await sender.connect(peer.handle)
        expected = torch.zeros(LAYOUT.shape, device="cuda")
        for src, dst, layers in CASES:
            await within(link.write(src, dst, layers))
            expected = landed(expected, sender.context.pool, src, dst, layers)
            assert await peer.ask("hash") == digest(expected)
        await link.close()
    await sender.stop()
