"""The ``rdma`` transport: handshake frames, the work-request planner, the transport over a
pyverbs double that copies like an RDMA WRITE, the real pyverbs API it calls, and (where a
device exists) a real end-to-end write."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import importlib.util
import itertools
import socket
import struct
import subprocess
import sys
import textwrap
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fdcore_plugins.transports import rdma, rdma_verbs
from fdcore_plugins.transports.rdma_plan import Chain, Region, WorkRequest, plan_writes
from fdcore_plugins.transports.rdma_verbs import (
    CHAINS_IN_FLIGHT,
    Device,
    RdmaError,
    Verbs,
    gid_text,
    status_name,
)
from fdcore_plugins.transports.rdma_wire import (
    HEADER,
    MAGIC,
    VERSION,
    HandshakeError,
    Hello,
    decode,
    encode_hello,
    encode_refusal,
    read_frame,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fdcore.errors import StartupError
from fdcore.kv import DTYPE_BYTES, KVLayout
from fdcore.registry import Registry
from fdcore.types import TransportContext

LAYOUT = KVLayout(num_layers=2, num_blocks=8, kv_heads=2, block_size=4, head_dim=3, model="m")
GID = bytes.fromhex("fe800000000000000202c9fffe000001")
HELLO = Hello(qp_num=17, psn=0xABCDE, lid=3, gid=GID, mtu=3, rkey=0x1234, addr=0x7F0000001000,
              nbytes=LAYOUT.pool_bytes, layout=LAYOUT)


def frame(kind: int, body: bytes, *, magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    return HEADER.pack(magic, version, kind, len(body)) + body


# --- handshake frames ---------------------------------------------------------------------

layouts = st.builds(
    KVLayout, num_layers=st.integers(1, 2**32 - 1), num_blocks=st.integers(1, 2**32 - 1),
    kv_heads=st.integers(1, 512), block_size=st.integers(1, 1024), head_dim=st.integers(1, 1024),
    dtype=st.sampled_from(sorted(DTYPE_BYTES)), model=st.text(max_size=40),
)
hellos = st.builds(
    Hello, qp_num=st.integers(0, 2**32 - 1), psn=st.integers(0, 2**24 - 1),
    lid=st.integers(0, 2**16 - 1), gid=st.binary(min_size=16, max_size=16),
    mtu=st.integers(1, 5), rkey=st.integers(0, 2**32 - 1), addr=st.integers(0, 2**64 - 1),
    nbytes=st.integers(0, 2**64 - 1), layout=layouts,
)


@given(hellos)
def test_a_hello_survives_encoding(hello: Hello) -> None:
    assert decode(encode_hello(hello)) == hello


def test_every_truncation_of_a_hello_is_a_clear_error() -> None:
    whole = encode_hello(HELLO)
    for size in range(len(whole)):
        with pytest.raises(HandshakeError, match=r"^(truncated|rdma handshake body is)"):
            decode(whole[:size])


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_is_a_handshake_error(data: bytes) -> None:
    with pytest.raises(HandshakeError):
        decode(data)


@given(st.binary(max_size=300))
def test_garbage_behind_a_valid_header_never_crashes(body: bytes) -> None:
    with contextlib.suppress(HandshakeError):
        decode(frame(1, body))


@pytest.mark.parametrize(("data", "message"), [
    (frame(1, b"", magic=b"HTTP"), "not an fdcore rdma handshake"),
    (frame(1, b"", version=VERSION + 1), f"version {VERSION + 1}, this side speaks {VERSION}"),
    (frame(7, b""), "unknown rdma handshake frame kind 7"),
    (HEADER.pack(MAGIC, VERSION, 1, 1 << 30), "body of 1073741824 bytes"),
    (encode_hello(HELLO) + b"x", "body is"),
    (frame(1, encode_hello(HELLO)[HEADER.size:] + b"x"), "1 bytes after its end"),
    (encode_refusal("KV layouts differ: model 'a' here"), "refused the connection: KV layouts"),
])
def test_bad_frames_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(HandshakeError, match=message):
        decode(data)


@pytest.mark.parametrize(("hello", "message"), [
    (replace(HELLO, psn=1 << 24), "PSN 16777216 does not fit 24 bits"),
    (replace(HELLO, mtu=9), "MTU code 9"),
])
def test_out_of_range_fields_are_refused(hello: Hello, message: str) -> None:
    with pytest.raises(HandshakeError, match=message):
        decode(encode_hello(hello))


def test_a_bad_layout_or_text_in_a_hello_is_refused() -> None:
    body = bytearray(encode_hello(HELLO)[HEADER.size:])
    zero_layers = body.copy()
    at = struct.calcsize("!IIH16sBIQQ")  # num_layers follows the queue pair and pool fields
    zero_layers[at:at + 4] = bytes(4)
    with pytest.raises(HandshakeError, match=r"layout: KVLayout\.num_layers"):
        decode(frame(1, bytes(zero_layers)))
    bad_model = body[:-1] + b"\xff"
    with pytest.raises(HandshakeError, match="model is not UTF-8"):
        decode(frame(1, bytes(bad_model)))


def test_a_hello_that_cannot_be_encoded_is_refused() -> None:
    with pytest.raises(HandshakeError, match="16 bytes"):
        encode_hello(replace(HELLO, gid=b"short"))
    with pytest.raises(HandshakeError, match="model name"):
        encode_hello(replace(HELLO, layout=replace(LAYOUT, model="m" * 5000)))


async def test_read_frame_reads_one_frame_and_names_a_cut_connection() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(encode_hello(HELLO) + b"next")
    assert decode(await read_frame(reader)) == HELLO
    cut = asyncio.StreamReader()
    cut.feed_data(encode_hello(HELLO)[:30])
    cut.feed_eof()
    with pytest.raises(HandshakeError, match="closed mid-handshake"):
        await read_frame(cut)
    foreign = asyncio.StreamReader()
    foreign.feed_data(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(HandshakeError, match="not an fdcore rdma handshake"):
        await read_frame(foreign)


# --- the planner --------------------------------------------------------------------------

LOCAL = Region(addr=0x10000, nbytes=LAYOUT.pool_bytes, key=0x11)
REMOTE = Region(addr=0x900000, nbytes=LAYOUT.pool_bytes, key=0x22)
SIZE = LAYOUT.block_bytes


def write(src: int, dst: int, length: int, signalled: bool) -> WorkRequest:
    return WorkRequest(LOCAL.addr + src, REMOTE.addr + dst, length, LOCAL.key, REMOTE.key,
                       signalled)


def requests(chains: list[Chain]) -> list[WorkRequest]:
    return [request for chain in chains for request in chain.requests]


def test_a_run_is_one_request_per_layer_and_kv() -> None:
    chains = plan_writes(LAYOUT, LAYOUT, [0, 1, 2], [3, 4, 5], local=LOCAL, remote=REMOTE,
                         max_chain=64)
    off = LAYOUT.offset
    assert chains == [Chain(0, (
        write(off(0, 0, 0), off(0, 0, 3), 3 * SIZE, False),
        write(off(0, 1, 0), off(0, 1, 3), 3 * SIZE, False),
        write(off(1, 0, 0), off(1, 0, 3), 3 * SIZE, False),
        write(off(1, 1, 0), off(1, 1, 3), 3 * SIZE, True),
    ))]
    assert chains[0].nbytes == 12 * SIZE


def test_blocks_out_of_order_are_one_request_each_for_the_chosen_layers() -> None:
    chains = plan_writes(LAYOUT, LAYOUT, [2, 0], [5, 1], [1], local=LOCAL, remote=REMOTE,
                         max_chain=64)
    off = LAYOUT.offset
    assert requests(chains) == [
        write(off(1, 0, 2), off(1, 0, 5), SIZE, False),
        write(off(1, 0, 0), off(1, 0, 1), SIZE, False),
        write(off(1, 1, 2), off(1, 1, 5), SIZE, False),
        write(off(1, 1, 0), off(1, 1, 1), SIZE, True),
    ]


@given(st.integers(1, 8), st.permutations(range(8)), st.integers(1, 8))
def test_chains_hold_at_most_max_chain_and_only_their_last_is_signalled(
    count: int, order: list[int], max_chain: int,
) -> None:
    src = order[:count]
    chains = plan_writes(LAYOUT, LAYOUT, src, list(range(count)), local=LOCAL, remote=REMOTE,
                         max_chain=max_chain)
    assert [chain.wr_id for chain in chains] == list(range(len(chains)))
    for chain in chains:
        assert 1 <= len(chain.requests) <= max_chain
        assert [r.signalled for r in chain.requests] == [False] * (len(chain.requests) - 1) + [True]
    assert all(len(chain.requests) == max_chain for chain in chains[:-1])
    assert sum(chain.nbytes for chain in chains) == count * 2 * LAYOUT.num_layers * SIZE


def test_a_range_longer_than_a_message_is_split() -> None:
    chains = plan_writes(LAYOUT, LAYOUT, [0, 1, 2], [0, 1, 2], [0], local=LOCAL, remote=REMOTE,
                         max_chain=64, max_message=2 * SIZE)
    off = LAYOUT.offset
    assert requests(chains) == [
        write(0, 0, 2 * SIZE, False), write(2 * SIZE, 2 * SIZE, SIZE, False),
        write(off(0, 1, 0), off(0, 1, 0), 2 * SIZE, False),
        write(off(0, 1, 2), off(0, 1, 2), SIZE, True),
    ]


def test_the_planner_refuses_what_cannot_be_written() -> None:
    with pytest.raises(ValueError, match="KV layouts differ: head_dim"):
        plan_writes(LAYOUT, replace(LAYOUT, head_dim=4), [0], [0], local=LOCAL, remote=REMOTE,
                    max_chain=4)
    with pytest.raises(ValueError, match="remote registered pool is 8 bytes"):
        plan_writes(LAYOUT, LAYOUT, [0], [0], local=LOCAL, remote=replace(REMOTE, nbytes=8),
                    max_chain=4)
    with pytest.raises(ValueError, match="max_chain"):
        plan_writes(LAYOUT, LAYOUT, [0], [0], local=LOCAL, remote=REMOTE, max_chain=0)
    with pytest.raises(ValueError, match="destination block 8 outside"):
        plan_writes(LAYOUT, LAYOUT, [0], [8], local=LOCAL, remote=REMOTE, max_chain=4)
    assert plan_writes(LAYOUT, LAYOUT, [], [], local=LOCAL, remote=REMOTE, max_chain=4) == []


# --- a pyverbs double: the same calls, RDMA WRITE done by memmove -------------------------


class Status(enum.IntEnum):
    IBV_WC_SUCCESS = 0
    IBV_WC_REM_ACCESS_ERR = 10


class PortState(enum.IntEnum):
    IBV_PORT_DOWN = 1
    IBV_PORT_ACTIVE = 4


class FakeError(Exception):
    pass


@dataclass
class Fabric:
    """Everything the double's objects share: registered regions, what was closed, knobs."""

    devices: list[str] = field(default_factory=lambda: ["fake0"])
    port_state: int = PortState.IBV_PORT_ACTIVE
    max_msg: int = 1 << 31
    status: int = Status.IBV_WC_SUCCESS
    deliver: bool = True
    regions: dict[int, tuple[int, int]] = field(default_factory=dict)
    closed: list[str] = field(default_factory=list)
    qps: list[Any] = field(default_factory=list)
    posted: list[list[Any]] = field(default_factory=list)
    keys: itertools.count[int] = field(default_factory=lambda: itertools.count(100))

    def resource(self, kind: str) -> type:
        fabric = self

        class Resource:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.args, self.kwargs, self.kind = args, kwargs, kind
                self.__dict__.update(kwargs)

            def close(self) -> None:
                fabric.closed.append(self.kind)

        return Resource

    def verbs(self) -> Verbs:
        fabric = self
        base = self.resource

        class Context(base("context")):
            def query_port(self, port: int) -> Any:
                return SimpleNamespace(state=fabric.port_state, lid=7, active_mtu=3,
                                       max_msg_sz=fabric.max_msg)

            def query_gid(self, port: int, index: int) -> str:
                return gid_text(GID)

        class MR(base("mr")):
            def __init__(self, pd: Any, length: int, access: int, address: int) -> None:
                super().__init__()
                self.lkey, self.rkey = next(fabric.keys), next(fabric.keys)
                fabric.regions[self.rkey] = (address, length)

        class CQ(base("cq")):
            def __init__(self, context: Any, cqe: int) -> None:
                super().__init__()
                self.done: deque[Any] = deque()

            def poll(self) -> tuple[int, list[Any]]:
                return (1, [self.done.popleft()]) if self.done else (0, [])

        class QP(base("qp")):
            def __init__(self, pd: Any, init: Any, attr: Any) -> None:
                super().__init__()
                self.cq, self.init, self.attr = init.scq, init, attr
                self.qp_num, self.state = 1000 + len(fabric.qps), "INIT"
                fabric.qps.append(self)

            def to_rtr(self, attr: Any) -> None:
                assert self.state == "INIT"
                self.state, self.rtr = "RTR", attr

            def to_rts(self, attr: Any) -> None:
                assert self.state == "RTR"
                self.state = "RTS"

            def post_send(self, head: Any) -> None:
                assert self.state == "RTS"
                chain = []
                while head is not None:
                    chain.append(head)
                    head = head.next_wr
                fabric.posted.append(chain)
                for wr in chain:
                    (sge,) = wr.sg
                    base_addr, length = fabric.regions[wr.rkey]
                    assert sge.length <= fabric.max_msg
                    assert base_addr <= wr.remote_addr <= base_addr + length - sge.length
                    if fabric.status == Status.IBV_WC_SUCCESS:
                        ctypes.memmove(wr.remote_addr, sge.addr, sge.length)
                    if wr.send_flags & 2 and fabric.deliver:
                        self.cq.done.append(SimpleNamespace(wr_id=wr.wr_id, status=fabric.status,
                                                            vendor_err=0x42))

        class SendWR(SimpleNamespace):
            def set_wr_rdma(self, rkey: int, addr: int) -> None:
                self.rkey, self.remote_addr = rkey, addr

        enums = SimpleNamespace(
            IBV_PORT_ACTIVE=PortState.IBV_PORT_ACTIVE, ibv_port_state=PortState,
            IBV_ACCESS_LOCAL_WRITE=1, IBV_ACCESS_REMOTE_WRITE=2, IBV_QPT_RC=2,
            IBV_WR_RDMA_WRITE=0, IBV_SEND_SIGNALED=2, IBV_WC_SUCCESS=0, ibv_wc_status=Status,
        )
        devices = [SimpleNamespace(name=name.encode()) for name in self.devices]
        return Verbs(
            device=SimpleNamespace(get_device_list=lambda: devices, Context=Context),
            pd=SimpleNamespace(PD=base("pd")), mr=SimpleNamespace(MR=MR),
            cq=SimpleNamespace(CQ=CQ),
            qp=SimpleNamespace(QPCap=SimpleNamespace, QPInitAttr=SimpleNamespace,
                               QPAttr=SimpleNamespace, QP=QP),
            wr=SimpleNamespace(SGE=lambda addr, length, lkey: SimpleNamespace(
                addr=addr, length=length, lkey=lkey), SendWR=SendWR),
            addr=SimpleNamespace(GID=lambda text: SimpleNamespace(gid=text),
                                 GlobalRoute=SimpleNamespace, AHAttr=SimpleNamespace),
            enums=enums, pyverbs_error=SimpleNamespace(PyverbsError=FakeError),
        )


def pool(layout: KVLayout, fill: bool) -> torch.Tensor:
    if fill:
        return torch.arange(layout.pool_bytes // 4, dtype=torch.float32).reshape(layout.shape)
    return torch.zeros(layout.shape)


@pytest.fixture
def fabric(monkeypatch: pytest.MonkeyPatch) -> Fabric:
    fake = Fabric()
    monkeypatch.setattr(rdma, "load", fake.verbs)
    return fake


async def started(config: rdma.RdmaConfig) -> tuple[rdma.RdmaTransport, rdma.RdmaTransport]:
    """A sender (its pool counting up) and a receiver (its pool zero), started, on one host."""
    sender = rdma.RdmaTransport(config, TransportContext(LAYOUT, pool=pool(LAYOUT, True)))
    receiver = rdma.RdmaTransport(config, TransportContext(LAYOUT, pool=pool(LAYOUT, False)))
    await sender.start()
    await receiver.start()
    return sender, receiver


@pytest.fixture
async def pair(fabric: Fabric) -> AsyncIterator[tuple[rdma.RdmaTransport, rdma.RdmaTransport]]:
    """:func:`started` over the double, with chains of three; both stopped at the end."""
    sender, receiver = await started(rdma.RdmaConfig(timeout_secs=5, max_chain=3))
    yield sender, receiver
    await sender.stop()
    await receiver.stop()


async def test_a_write_lands_in_the_receivers_blocks(
    pair: tuple[rdma.RdmaTransport, rdma.RdmaTransport], fabric: Fabric,
) -> None:
    sender, receiver = pair
    handle = await receiver.expose()
    assert handle["port"] > 0 and handle["layout"]["num_blocks"] == 8
    link = await sender.connect(handle)
    moved = await link.write([0, 1, 2, 6], [4, 5, 6, 0], [1])
    assert moved == 4 * 2 * SIZE
    src, dst = sender.context.pool, receiver.context.pool
    assert torch.equal(dst[1, :, [4, 5, 6, 0]], src[1, :, [0, 1, 2, 6]])
    assert not dst[0].any() and not dst[1, :, [1, 2, 3, 7]].any()
    # Runs 0-2 and 6, K and V: four requests, chains of at most max_chain=3.
    assert [len(chain) for chain in fabric.posted] == [3, 1]
    sent, answered = fabric.qps
    assert sent.rtr.dest_qp_num == answered.qp_num and answered.rtr.dest_qp_num == sent.qp_num
    assert sent.rtr.rq_psn == answered.rtr.sq_psn and answered.rtr.rq_psn == sent.rtr.sq_psn
    assert answered.attr.qp_access_flags == 1 | 2 and sent.attr.qp_access_flags == 1
    assert sent.rtr.ah_attr.gr.dgid.gid == gid_text(GID) and sent.rtr.path_mtu == 3
    await link.close()
    await link.close()
    with pytest.raises(RdmaError, match="closed"):
        await link.write([0], [0])


async def test_messages_longer_than_the_port_allows_are_split(fabric: Fabric) -> None:
    fabric.max_msg = SIZE
    sender, receiver = await started(rdma.RdmaConfig())
    link = await sender.connect(await receiver.expose())
    assert await link.write([0, 1], [2, 3]) == 2 * 2 * 2 * SIZE
    assert sum(len(chain) for chain in fabric.posted) == 8
    assert torch.equal(receiver.context.pool[:, :, 2:4], sender.context.pool[:, :, 0:2])
    await sender.stop()
    await receiver.stop()


async def test_a_bad_completion_names_its_status_and_breaks_the_link(
    pair: tuple[rdma.RdmaTransport, rdma.RdmaTransport], fabric: Fabric,
) -> None:
    sender, receiver = pair
    link = await sender.connect(await receiver.expose())
    fabric.status = Status.IBV_WC_REM_ACCESS_ERR
    with pytest.raises(RdmaError, match=r"IBV_WC_REM_ACCESS_ERR \(vendor error 0x42\)"):
        await link.write([0], [0])
    fabric.status = Status.IBV_WC_SUCCESS
    with pytest.raises(RdmaError, match="broken: rdma: RDMA WRITE failed"):
        await link.write([0], [0])


async def test_a_write_without_completion_times_out(fabric: Fabric) -> None:
    sender, receiver = await started(rdma.RdmaConfig(timeout_secs=0.5))
    link = await sender.connect(await receiver.expose())
    fabric.deliver = False
    with pytest.raises(TimeoutError, match="deadline"):
        await link.write([0], [0])
    await sender.stop()
    await receiver.stop()


def test_windows_keep_at_most_two_chains_in_flight(fabric: Fabric) -> None:
    verbs = fabric.verbs()
    device = Device(verbs, "", 1, 0, pool=(0, 0))
    qp = rdma_verbs.QueuePair(device, sender=True, max_chain=2)
    qp.connect(HELLO, 3)
    in_flight = []
    post = qp.qp.post_send

    def counting_post(head: Any) -> None:
        post(head)
        in_flight.append(len(qp.cq.done))

    qp.qp.post_send = counting_post
    fabric.regions[HELLO.rkey] = (0, 1 << 63)
    src = torch.zeros(64)
    chains = [Chain(i, (WorkRequest(src.data_ptr(), src.data_ptr(), 4, 1, HELLO.rkey, True),))
              for i in range(5)]
    qp.run(chains, deadline=float("inf"))
    assert max(in_flight) == CHAINS_IN_FLIGHT and not qp.cq.done
    qp.close()
    device.close()


async def test_a_layout_mismatch_is_refused_by_both_sides(
    pair: tuple[rdma.RdmaTransport, rdma.RdmaTransport],
) -> None:
    sender, receiver = pair
    handle = await receiver.expose()
    with pytest.raises(ValueError, match="KV layouts differ: model 'm' here, 'other' there"):
        await sender.connect({**handle, "layout": {**handle["layout"], "model": "other"}})
    other = KVLayout(2, 8, 2, 4, 3, model="other")
    _, writer, refusal = await handshake(handle, encode_hello(replace(HELLO, layout=other)))
    with pytest.raises(HandshakeError, match=r"refused the connection: KV layouts differ: model 'm' here, 'other' there \('here' is the receiver\)"):
        decode(refusal)
    writer.close()


async def test_garbage_on_the_handshake_port_is_refused_and_the_port_still_works(
    pair: tuple[rdma.RdmaTransport, rdma.RdmaTransport],
) -> None:
    sender, receiver = pair
    handle = await receiver.expose()
    _, writer, refusal = await handshake(handle, b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(HandshakeError, match="refused the connection: not an fdcore rdma"):
        decode(refusal)
    writer.close()
    link = await sender.connect(handle)
    assert await link.write([3], [3], [0]) == 2 * SIZE


async def handshake(
    handle: dict[str, Any], data: bytes,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection(handle["host"], handle["port"])
    writer.write(data)
    return reader, writer, await asyncio.wait_for(read_frame(reader), 5)


async def test_stop_closes_every_resource_once_dependants_first(fabric: Fabric) -> None:
    sender, receiver = await started(rdma.RdmaConfig())
    link = await sender.connect(await receiver.expose())
    await link.write([0], [1])
    await sender.stop()  # closes the link: the receiver's handler ends and closes its QP
    await asyncio.wait_for(asyncio.gather(*receiver._handlers), 5)
    await receiver.stop()
    closed = list(fabric.closed)
    await sender.stop()
    await receiver.stop()
    assert fabric.closed == closed
    assert Counter(closed) == {"qp": 2, "cq": 3, "mr": 2, "pd": 2, "context": 2}
    # The link's QP and CQ before the sender's MR, CQ, PD and context; the receiver's last.
    assert closed[:2] == ["qp", "cq"] and closed.index("mr") > 1
    assert closed[-4:] == ["mr", "cq", "pd", "context"]


async def test_start_refuses_a_missing_device_or_pool_clearly(fabric: Fabric) -> None:
    fabric.devices = []
    transport = rdma.RdmaTransport(rdma.RdmaConfig(),
                                   TransportContext(LAYOUT, pool=pool(LAYOUT, False)))
    with pytest.raises(StartupError, match=r"no RDMA device \(pyverbs.device.get_device_list"):
        await transport.start()
    fabric.devices = ["mlx5_0"]
    named = rdma.RdmaTransport(rdma.RdmaConfig(device="mlx5_9"),
                               TransportContext(LAYOUT, pool=pool(LAYOUT, False)))
    with pytest.raises(StartupError, match=r"no RDMA device 'mlx5_9' \(found: mlx5_0\)"):
        await named.start()
    fabric.port_state = PortState.IBV_PORT_DOWN
    down = rdma.RdmaTransport(rdma.RdmaConfig(), TransportContext(LAYOUT, pool=pool(LAYOUT, False)))
    with pytest.raises(StartupError, match=r"port 1 is not active \(state IBV_PORT_DOWN\)"):
        await down.start()
    assert fabric.closed == ["context"]
    no_pool = rdma.RdmaTransport(rdma.RdmaConfig(), TransportContext(LAYOUT))
    with pytest.raises(StartupError, match="no KV pool"):
        await no_pool.start()
    small = rdma.RdmaTransport(rdma.RdmaConfig(), TransportContext(LAYOUT, pool=torch.zeros(4)))
    with pytest.raises(StartupError, match="KV pool is 16 bytes"):
        await small.start()


async def test_the_handshake_port_is_the_configured_or_the_engines(fabric: Fabric) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        engine_port = free_port()
        transport = rdma.RdmaTransport(
            rdma.RdmaConfig(), TransportContext(LAYOUT, pool=pool(LAYOUT, False),
                                                ports=(engine_port, busy)))
        await transport.start()
        assert (await transport.expose())["port"] == engine_port
        await transport.stop()
        configured = rdma.RdmaTransport(
            rdma.RdmaConfig(ports=[busy]), TransportContext(LAYOUT, pool=pool(LAYOUT, False),
                                                            ports=(engine_port,)))
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{busy}"):
            await configured.start()
    assert Counter(fabric.closed) == {"mr": 2, "cq": 2, "pd": 2, "context": 2}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_transport_not_started_says_so(fabric: Fabric) -> None:
    transport = rdma.RdmaTransport(rdma.RdmaConfig(), TransportContext(LAYOUT))
    with pytest.raises(RdmaError, match="not started"):
        await transport.expose()
    await transport.stop()


# --- config and registration --------------------------------------------------------------


def test_config_keys_defaults_and_strictness() -> None:
    config = rdma.RdmaConfig.model_validate({"gid-index": 3, "ports": ["8100", "8101"],
                                             "max-chain": 16, "mtu": 4096})
    assert (config.device, config.ib_port, config.timeout_secs) == ("", 1, 10)
    assert (config.gid_index, config.ports, config.max_chain, config.mtu) == (3, [8100, 8101],
                                                                             16, 4096)
    for bad in ({"mtu": 1000}, {"max-chain": 0}, {"timeout-secs": 0}, {"rkey": 1}):
        with pytest.raises(ValidationError):
            rdma.RdmaConfig.model_validate(bad)


def test_the_plugin_registers_rdma() -> None:
    registry = Registry()
    rdma.fdcore_register_transports(registry.register_for("rdma"))
    assert registry.get("transport", "rdma").cls is rdma.RdmaTransport


# --- without pyverbs, and the real pyverbs API --------------------------------------------


def test_the_plugin_imports_without_pyverbs_and_start_says_how_to_install_it() -> None:
    code = textwrap.dedent("""
        import asyncio, sys
        sys.modules["pyverbs"] = None
        from fdcore.errors import StartupError
        from fdcore.kv import KVLayout
        from fdcore.types import TransportContext
        from fdcore_plugins.transports import rdma
        transport = rdma.RdmaTransport(rdma.RdmaConfig(), TransportContext(KVLayout(1, 1, 1, 1, 1)))
        try:
            asyncio.run(transport.start())
        except StartupError as exc:
            print(exc)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert "rdma: pyverbs is not importable" in done.stdout
    assert "python3-pyverbs" in done.stdout and "make pyverbs" in done.stdout


needs_pyverbs = pytest.mark.skipif(importlib.util.find_spec("pyverbs") is None,
                                   reason="pyverbs not importable (make pyverbs)")


@needs_pyverbs
def test_the_double_makes_the_calls_real_pyverbs_accepts() -> None:
    verbs = rdma_verbs.load()
    e = verbs.enums
    fake = Fabric().verbs().enums
    for name in ("IBV_PORT_ACTIVE", "IBV_ACCESS_LOCAL_WRITE", "IBV_ACCESS_REMOTE_WRITE",
                 "IBV_QPT_RC", "IBV_WR_RDMA_WRITE", "IBV_SEND_SIGNALED", "IBV_WC_SUCCESS"):
        assert getattr(e, name) == getattr(fake, name), name
    assert e.ibv_wc_status(10).name == "IBV_WC_REM_ACCESS_ERR"
    assert status_name(e, 12) == "IBV_WC_RETRY_EXC_ERR" and status_name(e, 999) == "status 999"
    verbs.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=None, rcq=None, sq_sig_all=0,
                        cap=verbs.qp.QPCap(max_send_wr=128, max_recv_wr=1, max_send_sge=1,
                                           max_recv_sge=1))
    attr = verbs.qp.QPAttr(port_num=1, path_mtu=3)
    for name, value in (("pkey_index", 0), ("qp_access_flags", 3), ("dest_qp_num", 9),
                        ("rq_psn", 5), ("max_dest_rd_atomic", 1), ("min_rnr_timer", 12),
                        ("sq_psn", 6), ("timeout", 14), ("retry_cnt", 7), ("rnr_retry", 7),
                        ("max_rd_atomic", 1)):
        setattr(attr, name, value)
        assert getattr(attr, name) == value
    route = verbs.addr.GlobalRoute(dgid=verbs.addr.GID(gid_text(GID)), sgid_index=1,
                                   hop_limit=64)
    attr.ah_attr = verbs.addr.AHAttr(dlid=3, port_num=1, is_global=1, gr=route)
    assert attr.ah_attr.dgid == gid_text(GID) and attr.ah_attr.dlid == 3
    verbs.addr.AHAttr(dlid=3, port_num=1)
    sge = verbs.wr.SGE(0x1000, 64, 7)
    last = verbs.wr.SendWR(wr_id=1, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[sge],
                           send_flags=e.IBV_SEND_SIGNALED, next_wr=None)
    head = verbs.wr.SendWR(wr_id=1, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[sge],
                           send_flags=0, next_wr=last)
    head.set_wr_rdma(0x22, 0x2000)
    assert (head.send_flags, last.send_flags, head.num_sge) == (0, e.IBV_SEND_SIGNALED, 1)


@needs_pyverbs
async def test_start_without_a_device_says_no_rdma_device() -> None:
    if rdma_verbs.device_names(rdma_verbs.load()):
        pytest.skip("this host has an RDMA device")
    transport = rdma.RdmaTransport(rdma.RdmaConfig(),
                                   TransportContext(LAYOUT, pool=pool(LAYOUT, False)))
    with pytest.raises(StartupError, match="no RDMA device"):
        await transport.start()


def rdma_devices() -> list[str]:
    try:
        return rdma_verbs.device_names(rdma_verbs.load())
    except StartupError:
        return []


@pytest.mark.skipif(not rdma_devices(), reason="no RDMA device")
async def test_end_to_end_on_a_real_device() -> None:
    sender = rdma.RdmaTransport(rdma.RdmaConfig(),
                                TransportContext(LAYOUT, pool=pool(LAYOUT, True)))
    receiver = rdma.RdmaTransport(rdma.RdmaConfig(),
                                  TransportContext(LAYOUT, pool=pool(LAYOUT, False)))
    await sender.start()
    await receiver.start()
    try:
        link = await sender.connect(await receiver.expose())
        assert await link.write([0, 1, 5], [7, 2, 3]) == 3 * 2 * 2 * SIZE
        src, dst = sender.context.pool, receiver.context.pool
        assert torch.equal(dst[:, :, [7, 2, 3]], src[:, :, [0, 1, 5]])
        assert not dst[:, :, [0, 1, 4, 5, 6]].any()
        await link.close()
    finally:
        await sender.stop()
        await receiver.stop()
