"""``tcp``: KV blocks between hosts without RDMA, over one TCP connection per link.

The receiver listens on its own port (``port: 0`` takes a free one, advertised in the handle).
A write is one request on the link's connection: a frame header (magic, version, length), a
msgpack header ``{"tid", "blocks", "layers", "nbytes"}`` and then the blocks' bytes, gathered
straight from the sender's pool memory by ``sendmsg`` calls of about 2 MiB of ranges each.
The receiver works the destination ranges out itself from the block ids, the layers and its
own layout (so a sender can address nothing but blocks it named), asks the engine whether they
are reserved for that transfer (``TransportContext.accept_write``: a late write after an abort
or an expiry is read and discarded, never landed), receives straight into its pool with
``recvmsg_into`` and answers with the byte count or an error. The bytes go in the order
:func:`fdcore.kv.plan_copies` gives (layer, K then V, destination blocks in order), which is the
same on both sides; each side plans a few layers at a time while the other moves the last ones.
A pool on a device is staged through a pinned host buffer (``PoolWindow``).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import structlog
from pydantic import Field

import fdcore
from fdcore.bases import BaseTransport
from fdcore.kv import Copy, KVLayout
from fdcore.lazy import lazy_module
from fdcore.registry import Register
from fdcore.types import StrictModel, TransportContext

if TYPE_CHECKING:
    import msgpack
else:
    msgpack = lazy_module("msgpack")

from .pool_access import (
    PoolWindow,
    check_writable,
    layout_dict,
    layout_of,
    plan_groups,
    recv_all,
    recv_exactly,
    send_all,
)

log = structlog.get_logger(__name__)

MAGIC = b"FDKV"
VERSION = 1
FRAME = struct.Struct("!4sBI")  # magic, version, msgpack header length
ANSWER = struct.Struct("!BQI")  # ok, bytes landed, message length (then the message)
MAX_HEADER = 16 << 20
DISCARD_CHUNK = 1 << 20


class TcpConfig(StrictModel):
    """Where the receiver listens, and how long one write may take."""

    host: str = Field("", description="address to listen on; empty: the engine's host")
    port: int = Field(0, ge=0, le=65535, description="port to listen on; 0: any free one")
    timeout_secs: float = Field(30.0, gt=0, description="seconds one write (or the payload of "
                                "one received write) may take")


class TcpLink:
    """A sender's connection to one receiver; writes on it are serialised."""

    def __init__(self, transport: TcpTransport, remote: KVLayout, host: str, port: int) -> None:
        self.transport = transport
        self.remote = remote
        self.address = (host, port)
        self._sock: socket.socket | None = None
        self._window: PoolWindow | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def write(
        self, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
        layers: Sequence[int] | None = None, *, transfer_id: str = "",
    ) -> int:
        """Send the blocks; returns once the receiver says they landed, raises otherwise."""
        local = check_writable("tcp", self.transport.context, self.remote)
        nbytes, groups = plan_groups(local, self.remote, src_block_ids, dst_block_ids, layers)
        header = msgpack.packb({"tid": transfer_id, "blocks": list(dst_block_ids),
                                "layers": None if layers is None else list(layers),
                                "nbytes": nbytes})
        timeout = self.transport.config.timeout_secs
        async with self._lock:
            if self._closed:
                raise ConnectionError(f"tcp: the link to {self._where()} is closed")
            try:
                async with asyncio.timeout(timeout):
                    return await self._send(FRAME.pack(MAGIC, VERSION, len(header)) + header,
                                            groups)
            except TimeoutError:
                self._drop()
                raise TimeoutError(f"tcp: the write to {self._where()} did not complete "
                                   f"within {timeout}s") from None
            except BaseException:  # cancelled or broken mid-request: the stream is unusable
                self._drop()
                raise

    async def _send(self, header: bytes, groups: Iterable[list[Copy]]) -> int:
        loop = asyncio.get_running_loop()
        sock = await self._connected()
        window = self._window = self._window or self.transport.window()
        pending = [memoryview(header)]
        for copies in groups:  # the next group is planned while the peer drains this one
            for chunk in window.chunks([(c.src, c.nbytes) for c in copies]):
                await send_all(loop, sock, [*pending, *await window.read(chunk)])
                pending = []
        await send_all(loop, sock, pending)
        ok, landed, length = ANSWER.unpack(await recv_exactly(loop, sock, ANSWER.size))
        message = (await recv_exactly(loop, sock, length)).decode(errors="replace")
        if not ok:
            raise RuntimeError(f"tcp: {self._where()} refused the write: {message}")
        return int(landed)

    async def close(self) -> None:
        """Close the connection once a write in flight on it has ended (idempotent); later
        writes fail. Never under a write: its socket may be registered with the event loop,
        and a descriptor closed there is soon reused by another connection, which the
        write's clean-up would then unregister (the engine's HTTP connections hung so)."""
        self._closed = True
        self.transport.links.discard(self)
        async with self._lock:
            self._drop()

    async def _connected(self) -> socket.socket:
        if self._sock is None:
            loop = asyncio.get_running_loop()
            host, port = self.address
            try:
                family, kind, proto, _, address = (await loop.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM))[0]
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                raise ConnectionError(f"tcp: cannot reach {self._where()}: {exc}") from None
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await loop.sock_connect(sock, address)
            except BaseException as exc:
                sock.close()
                if isinstance(exc, OSError):
                    raise ConnectionError(f"tcp: cannot connect to {self._where()}: "
                                          f"{exc}") from None
                raise
            self._sock = sock
        return self._sock

    def _where(self) -> str:
        return f"the receiver at {self.address[0]}:{self.address[1]}"

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class TcpTransport(BaseTransport[TcpConfig]):
    """KV transport over TCP: the sender gathers from its pool, the receiver lands in its."""

    name = "tcp"
    Config = TcpConfig

    def __init__(self, config: TcpConfig, context: TransportContext) -> None:
        super().__init__(config, context)
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted: set[socket.socket] = set()
        self.links: set[TcpLink] = set()

    async def start(self) -> None:
        """Listen on ``host:port``."""
        host = self.config.host or self.context.host
        try:
            listener = socket.create_server(
                (host, self.config.port), backlog=64,
                family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as exc:
            raise OSError(f"tcp: cannot listen on {host}:{self.config.port}: {exc}") from None
        listener.setblocking(False)
        self._listener = listener
        self._spawn(self._accept(listener), "fdcore-tcp-kv-accept")

    async def stop(self) -> None:
        """Close every link, stop listening and drop every connection (idempotent)."""
        for link in list(self.links):
            await link.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in self._accepted:  # a task cancelled before it ran never closed its socket
            sock.close()
        self._accepted.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    @property
    def port(self) -> int:
        """The port listened on."""
        if self._listener is None:
            raise RuntimeError("tcp: the transport is not started")
        return int(self._listener.getsockname()[1])

    async def expose(self) -> dict[str, Any]:
        """``host``, ``port`` and the pool's layout."""
        if self.context.layout is None:
            raise RuntimeError("tcp: the KV pool is not allocated yet")
        host = self.config.host
        if host in ("", "0.0.0.0", "::"):  # a wildcard is no address for a peer
            host = self.context.host
        return {"host": host, "port": self.port, "layout": layout_dict(self.context.layout)}

    async def connect(self, handle: Mapping[str, Any]) -> TcpLink:
        """A connected link to the receiver behind ``handle``."""
        remote = layout_of(handle)
        check_writable("tcp", self.context, remote)
        host, port = handle.get("host"), handle.get("port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise ValueError("tcp: the handle needs a host and a port")
        link = TcpLink(self, remote, host, port)
        await link._connected()
        self.links.add(link)
        return link

    def window(self) -> PoolWindow:
        """A host-memory window onto this engine's pool (staged when it is on a device)."""
        pool = self.context.pool
        return PoolWindow(pool, self.context, staged=pool.device.type != "cpu")

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, peer = await loop.sock_accept(listener)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._accepted.add(sock)
            self._spawn(self._serve(sock, peer), "fdcore-tcp-kv-connection")

    async def _serve(self, sock: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        window: PoolWindow | None = None
        try:
            while True:
                try:
                    head = await recv_exactly(loop, sock, FRAME.size)
                except ConnectionError:
                    return  # the sender closed between writes: the normal end of a link
                window = window or self.window()
                await self._receive(loop, sock, head, window)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # anything a peer sends ends its connection, never the server
            log.warning("tcp_kv.connection_closed", peer=str(peer), error=repr(exc))
        finally:
            sock.close()
            self._accepted.discard(sock)

    async def _receive(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, head: bytes,
                       window: PoolWindow) -> None:
        magic, version, length = FRAME.unpack(head)
        if magic != MAGIC or version != VERSION or length > MAX_HEADER:
            raise ValueError(f"not an fdcore KV write (magic {magic!r}, version {version}, "
                             f"header {length} bytes)")
        async with asyncio.timeout(self.config.timeout_secs):
            header = msgpack.unpackb(await recv_exactly(loop, sock, length), raw=False)
            tid, blocks, layers, nbytes = _fields(header, self.context.layout)
            problem, groups = self._plan(tid, blocks, layers, nbytes)
            if problem:
                await _discard(loop, sock, nbytes)
                await send_all(loop, sock, [memoryview(_answer(False, 0, problem))])
                return
            for copies in groups:  # the next group is planned while the sender sends this one
                for chunk in window.chunks([(c.dst, c.nbytes) for c in copies]):
                    await recv_all(loop, sock, window.landing(chunk))
                    await window.land(chunk)
            await send_all(loop, sock, [memoryview(_answer(True, nbytes, ""))])

    def _plan(self, tid: str, blocks: list[int], layers: list[int] | None,
              nbytes: int) -> tuple[str, Iterable[list[Copy]]]:
        layout = self.context.layout
        outside = [b for b in blocks if not 0 <= b < layout.num_blocks]
        if outside:  # (planned as both ends, the plan would blame a "source" block)
            return f"destination block {outside[0]} outside 0..{layout.num_blocks - 1}", []
        try:
            planned, groups = plan_groups(layout, layout, blocks, blocks, layers)
        except ValueError as exc:
            return str(exc), []
        if planned != nbytes:
            return f"{nbytes} bytes announced for {len(blocks)} blocks", []
        accept = self.context.accept_write
        if accept is not None and not accept(tid, blocks):
            return f"blocks {blocks[:8]} are not reserved for transfer {tid!r}", []
        return "", groups


def _fields(header: Any, layout: KVLayout) -> tuple[str, list[int], list[int] | None, int]:
    if isinstance(header, dict):
        tid, blocks, layers, nbytes = (header.get(k) for k in ("tid", "blocks", "layers",
                                                                "nbytes"))
        # More than a pool's bytes cannot be a write of ours: no payload worth skipping past.
        if (isinstance(tid, str) and _ints(blocks) and (layers is None or _ints(layers))
                and isinstance(nbytes, int) and 0 <= nbytes <= layout.pool_bytes):
            return tid, blocks, layers, nbytes
    raise ValueError("malformed KV write header")


def _ints(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(type(i) is int for i in value)


async def _discard(loop: asyncio.AbstractEventLoop, sock: socket.socket, nbytes: int) -> None:
    scratch = memoryview(bytearray(min(nbytes, DISCARD_CHUNK)))
    while nbytes > 0:
        take = min(nbytes, scratch.nbytes)
        await recv_all(loop, sock, [scratch[:take]])
        nbytes -= take


def _answer(ok: bool, landed: int, message: str) -> bytes:
    encoded = message.encode()
    return ANSWER.pack(int(ok), landed, len(encoded)) + encoded


@fdcore.hookimpl
def fdcore_register_transports(register: Register) -> None:
    """Register ``tcp``."""
    register.add_transport(TcpTransport)
