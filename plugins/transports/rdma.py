"""``rdma``: KV blocks written by RDMA WRITE straight into the receiver's registered pool.

At :meth:`~RdmaTransport.start` each engine opens its device port, registers the pool the
engine allocated (once, for local and remote writes) and listens for handshakes on its rdma
comm port. A sender's :meth:`~RdmaTransport.connect` creates an RC queue pair and trades
:class:`~fdcore_plugins.transports.rdma_wire.Hello` frames with the receiver over TCP; each
side moves its queue pair INIT -> RTR -> RTS (the receiver before it answers, so the sender
never writes to a queue pair that is not ready). The TCP connection stays open for the link's
life: when it closes, the receiver destroys its queue pair. A write is planned by
:mod:`~fdcore_plugins.transports.rdma_plan` and posted and polled in a thread, with a deadline.
See ``docs/rdma.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal

import structlog
from pydantic import Field

import fdcore
from fdcore.bases import BaseTransport
from fdcore.errors import StartupError
from fdcore.kv import KVLayout
from fdcore.registry import Register
from fdcore.types import StrictModel, TransportContext

from .rdma_plan import MAX_MESSAGE, Region, plan_writes
from .rdma_verbs import Device, QueuePair, RdmaError, load, pool_memory
from .rdma_wire import (
    HandshakeError,
    Hello,
    decode,
    encode_hello,
    encode_refusal,
    layout_from_handle,
    read_frame,
)

log = structlog.get_logger(__name__)

MTU_CODES = {256: 1, 512: 2, 1024: 3, 2048: 4, 4096: 5}  # enum ibv_mtu


class RdmaConfig(StrictModel):
    """Options of the ``rdma`` transport."""

    device: str = Field("", description="RDMA device name (`ibv_devices`); empty: the first")
    gid_index: int = Field(0, ge=0, description="GID table index (RoCE: the v2 entry)")
    ib_port: int = Field(1, ge=1, description="device port number")
    ports: list[int] = Field(default_factory=list, description=(
        "handshake ports, the first listened on; none: the engine's --rdma-comm-ports "
        "(TransportContext.ports), or any free port when it has none"))
    timeout_secs: float = Field(10, gt=0, description="seconds a handshake or a write may take")
    max_chain: int = Field(64, ge=1, le=4096, description="work requests posted at once")
    mtu: Literal[0, 256, 512, 1024, 2048, 4096] = Field(
        0, description="path MTU in bytes; 0: the port's active MTU")


class RdmaTransport(BaseTransport[RdmaConfig]):
    """Both halves of ``rdma``: exposes this engine's registered pool and writes into others'.
    """

    name = "rdma"
    Config = RdmaConfig

    def __init__(self, config: RdmaConfig, context: TransportContext) -> None:
        super().__init__(config, context)
        self._device: Device | None = None
        self._server: asyncio.Server | None = None
        self._port = 0
        self._handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._links: set[RdmaLink] = set()
        self._stopped = False

    async def start(self) -> None:
        """Open the device, register the pool and listen for handshakes."""
        verbs = load()
        addr, nbytes = pool_memory(self.context.pool, self.context.layout)
        ports = self.config.ports or self.context.ports
        port = ports[0] if ports else 0
        try:
            self._device = Device(verbs, self.config.device, self.config.ib_port,
                                  self.config.gid_index, pool=(addr, nbytes))
            try:
                self._server = await asyncio.start_server(self._accept, self.context.host, port)
            except OSError as exc:
                raise StartupError(f"rdma: cannot listen on {self.context.host}:{port}: "
                                   f"{exc.strerror or exc}") from None
        except BaseException:
            await self.stop()
            raise
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("rdma ready", device=self._device.name, port=self._port, pool_bytes=nbytes)

    async def expose(self) -> dict[str, Any]:
        """``{"host", "port", "layout", "device"}``: where to hand-shake, and the pool's
        layout (the rkey and addresses travel in the handshake)."""
        device = self._started()
        return {"host": self.context.host, "port": self._port,
                "layout": asdict(self.context.layout), "device": device.name}

    async def connect(self, handle: Mapping[str, Any]) -> RdmaLink:
        """Hand-shake with the receiver behind ``handle`` and return a link to its pool."""
        device = self._started()
        host, port = handle.get("host"), handle.get("port")
        problem = self.context.layout.mismatch(layout_from_handle(handle.get("layout")))
        if problem:
            raise ValueError(f"rdma: {problem}")
        timeout = self.config.timeout_secs
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as exc:
            raise RdmaError(f"rdma: cannot reach {host}:{port}: "
                            f"{str(exc) or 'timed out'}") from None
        try:
            qp = QueuePair(device, sender=True, max_chain=self.config.max_chain)
        except BaseException:
            writer.close()
            raise
        try:
            writer.write(encode_hello(self._hello(qp)))
            remote = decode(await asyncio.wait_for(read_frame(reader), timeout))
            problem = self.context.layout.mismatch(remote.layout)
            if problem:
                raise HandshakeError(problem)
            qp.connect(remote, self._path_mtu(remote))
        except BaseException as exc:
            qp.close()
            writer.close()
            if isinstance(exc, OSError | TimeoutError | HandshakeError):
                raise RdmaError(f"rdma: handshake with {host}:{port} failed: "
                                f"{str(exc) or 'timed out'}") from None
            raise
        link = RdmaLink(qp, writer, self.config, (device.pool, self.context.layout),
                        (Region(remote.addr, remote.nbytes, remote.rkey), remote.layout),
                        on_close=self._links.discard)
        self._links.add(link)
        return link

    async def stop(self) -> None:
        """Close links and handshakes, then the device's resources, once."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.close()
        for writer in self._handlers.values():
            writer.close()  # the handler's read sees the end and it closes its queue pair
        await asyncio.gather(*self._handlers, return_exceptions=True)
        for link in list(self._links):
            await link.close()
        if self._server is not None:
            await self._server.wait_closed()
        if self._device is not None:
            self._device.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        qp: QueuePair | None = None
        try:
            qp = await self._answer(reader, writer)
            while await reader.read(4096):  # the link's life: the sender closes it when done
                pass
        except (HandshakeError, RdmaError, TimeoutError) as exc:
            log.warning("rdma handshake refused", peer=writer.get_extra_info("peername"),
                        error=str(exc) or "timed out")
            writer.write(encode_refusal(str(exc) or "timed out"))
        except OSError:
            pass  # the sender went away; its queue pair goes with the connection
        finally:
            if qp is not None:
                qp.close()
            writer.close()
            del self._handlers[task]

    async def _answer(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> QueuePair:
        """The receiver's half of a handshake: a queue pair in RTS, announced to the sender."""
        remote = decode(await asyncio.wait_for(read_frame(reader), self.config.timeout_secs))
        problem = self.context.layout.mismatch(remote.layout)
        if problem:
            raise HandshakeError(f"{problem} ('here' is the receiver)")
        qp = QueuePair(self._started(), sender=False, max_chain=1)
        try:
            qp.connect(remote, self._path_mtu(remote))
            writer.write(encode_hello(self._hello(qp)))
            await writer.drain()
        except BaseException:
            qp.close()
            raise
        return qp

    def _hello(self, qp: QueuePair) -> Hello:
        device = self._started()
        return Hello(qp.qp_num, qp.psn, device.lid, device.gid, self._mtu(device), device.rkey,
                     device.pool.addr, device.pool.nbytes, self.context.layout)

    def _mtu(self, device: Device) -> int:
        return MTU_CODES[self.config.mtu] if self.config.mtu else device.active_mtu

    def _path_mtu(self, remote: Hello) -> int:
        return min(self._mtu(self._started()), remote.mtu)

    def _started(self) -> Device:
        if self._device is None or self._stopped:
            raise RdmaError("rdma: the transport is not started")
        return self._device


class RdmaLink:
    """A sender's queue pair connected to one receiver's registered pool.

    Writes on one link run one at a time. One that fails or times out breaks the link (its
    queue pair may still hold requests): later writes raise at once, and the engine connects
    again.
    """

    def __init__(
        self, qp: QueuePair, writer: asyncio.StreamWriter, config: RdmaConfig,
        local: tuple[Region, KVLayout], remote: tuple[Region, KVLayout],
        on_close: Callable[[RdmaLink], None],
    ) -> None:
        self._qp = qp
        self._writer = writer
        self._config = config
        self._local, self._remote = local, remote
        self._on_close = on_close
        self._lock = asyncio.Lock()
        self._job: asyncio.Future[None] | None = None
        self._broken = ""
        self._closed = False

    async def write(
        self, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
        layers: Sequence[int] | None = None, *, transfer_id: str = "",
    ) -> int:
        """Write the blocks and wait for their completions; return the bytes written.

        ``transfer_id`` is not checked here: RDMA lands the bytes without the receiver's code
        running, and the control plane tells the receiver which blocks were written for what.
        """
        (local, local_layout), (remote, remote_layout) = self._local, self._remote
        chains = plan_writes(
            local_layout, remote_layout, src_block_ids, dst_block_ids, layers, local=local,
            remote=remote, max_chain=self._config.max_chain,
            max_message=min(MAX_MESSAGE, self._qp.device.max_message),
        )
        async with self._lock:
            if self._closed or self._broken:
                raise RdmaError(f"rdma: the link is {self._broken or 'closed'}")
            if not chains:
                return 0
            deadline = time.monotonic() + self._config.timeout_secs
            loop = asyncio.get_running_loop()
            self._job = loop.run_in_executor(None, self._qp.run, chains, deadline)
            try:
                # Shielded: the queue pair is in use until the thread returns, cancelled or not.
                await asyncio.shield(self._job)
            except asyncio.CancelledError:
                self._broken = "broken: a write was cancelled before its completion"
                raise
            except (RdmaError, TimeoutError) as exc:
                self._broken = f"broken: {exc}"
                raise
        return sum(chain.nbytes for chain in chains)

    async def close(self) -> None:
        """Destroy the queue pair (after any write's thread has returned) and close the
        handshake connection, which tells the receiver to destroy its own."""
        if self._closed:
            return
        self._closed = True
        self._qp.abandon()
        if self._job is not None:
            await asyncio.wait([self._job])
        self._qp.close()
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        self._on_close(self)


@fdcore.hookimpl
def fdcore_register_transports(register: Register) -> None:
    """Register ``rdma``."""
    register.add_transport(RdmaTransport)
