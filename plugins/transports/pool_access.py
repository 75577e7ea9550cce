"""What the ``ipc`` and ``tcp`` transports share: a pool's layout in a handle, byte views of the
pool, the torch thread, and host-memory windows onto a pool with the socket calls that fill
and drain them."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from fdcore.kv import Copy, KVLayout, plan_copies
from fdcore.lazy import lazy_module
from fdcore.types import TransportContext

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

T = TypeVar("T")
LAYOUT_FIELDS = ("num_layers", "num_blocks", "kv_heads", "block_size", "head_dim", "dtype",
                 "model")
# A tcp write is planned this many bytes' worth of layers at a time, each group while the peer
# moves the last one: planning costs about 1.2 us a range on each side, and streaming it so
# made a 64 MiB loopback write of scattered 16 KiB blocks 25-35% faster than planning first.
GROUP_BYTES = 4 << 20
# Block rows move through a buffer this big: small enough to stay in cache between its gather
# and its scatter, large enough that the two calls per chunk cost nothing next to the bytes.
CHUNK_BYTES = 4 << 20
# A range this long is copied on its own: the per-call cost is lost in its bytes (see
# BlockCopier for the measurements).
DIRECT_BYTES = 256 << 10
# The widest element that divides a block: index_select moves elements, and the fewer there
# are the faster it goes (complex128 only ever moves bits: no arithmetic touches them).
_ROW_DTYPES = ((16, "complex128"), (8, "int64"), (4, "int32"), (2, "int16"), (1, "uint8"))
# A staged (device) pool moves through host memory this many bytes at a time: large enough
# that a copy and a send call cost little next to the bytes, small enough to pin per link.
STAGE_BYTES = 16 << 20
Range = tuple[int, int]  # (byte offset in the pool, nbytes)
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
# Bytes one sendmsg/recvmsg_into call is offered: about what a loopback socket buffer holds. A
# call takes what the buffer has, and the kernel reads every iovec it is given each time, so
# offering all of a write's 16 KiB ranges at once (1,024 iovecs a call) cost more than the copy.
BATCH_BYTES = 2 << 20


def layout_dict(layout: KVLayout) -> dict[str, Any]:
    """``layout`` as a handle carries it."""
    return {name: getattr(layout, name) for name in LAYOUT_FIELDS}


def layout_of(handle: Mapping[str, Any]) -> KVLayout:
    """The layout a handle carries; :class:`ValueError` when it carries none that is valid."""
    value = handle.get("layout")
    if not isinstance(value, Mapping):
        raise ValueError("the transport handle carries no KV layout")
    try:
        return KVLayout(**{name: value[name] for name in LAYOUT_FIELDS})
    except (KeyError, TypeError) as exc:
        raise ValueError(f"the transport handle's KV layout is malformed: {exc!r}") from None


def check_writable(name: str, context: TransportContext, remote: KVLayout) -> KVLayout:
    """This engine's layout, refusing a pool not allocated yet or one whose blocks cannot be
    written into ``remote``'s (the message names the field that differs)."""
    local: KVLayout | None = context.layout
    if local is None or context.pool is None:
        raise RuntimeError(f"{name}: the KV pool is not allocated yet")
    problem = local.mismatch(remote)
    if problem:
        raise ValueError(f"{name}: {problem}")
    return local


def pool_bytes(pool: torch.Tensor) -> torch.Tensor:
    """The pool as one flat ``uint8`` tensor over the same memory."""
    if not pool.is_contiguous():
        raise ValueError("the KV pool must be contiguous")
    return pool.view(-1).view(torch.uint8)


def plan_groups(
    src: KVLayout, dst: KVLayout, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
    layers: Sequence[int] | None = None, group_bytes: int = GROUP_BYTES,
) -> tuple[int, Iterator[list[Copy]]]:
    """:func:`fdcore.kv.plan_copies` for a few layers at a time: the write's bytes and its
    copies in groups of about ``group_bytes``, in the plan's order. Everything the plan
    refuses is refused here, before any group is made."""
    chosen = list(range(src.num_layers)) if layers is None else list(layers)
    plan_copies(src, dst, src_block_ids, dst_block_ids, [])  # the layouts and the block ids
    plan_copies(src, dst, [], [], chosen)  # the layers
    per_layer = len(src_block_ids) * 2 * src.block_bytes
    step = max(1, group_bytes // max(1, per_layer))
    groups = (plan_copies(src, dst, src_block_ids, dst_block_ids, chosen[i:i + step])
              for i in range(0, len(chosen), step))
    return per_layer * len(chosen), groups


class BlockCopier:
    """Copies a plan's ranges from one pool's bytes into another's (call it on the torch
    thread; keep one per link: it keeps its buffers).

    A range of ``direct_bytes`` or more is one ``copy_``. A smaller one would pay about 6 us of
    Python and dispatch for little data (a write of scattered blocks is one range per block,
    layer and K/V), so those are gathered ``chunk_bytes`` at a time into a buffer
    (``index_select`` on rows of one block) and scattered out (``index_copy_``): two parallel
    calls per chunk. Measured on 2 CPUs, 64 MiB into a peer's memfd pool: 16 KiB blocks at
    random 2.8 GiB/s by ``copy_``, 7.0 gathered; 1 MiB blocks 14.1 by ``copy_``, 7.0 gathered;
    one ``copy_`` of all 64 MiB 15.
    """

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, unit: int,
                 chunk_bytes: int = CHUNK_BYTES, direct_bytes: int = DIRECT_BYTES) -> None:
        width, dtype_name = next((w, d) for w, d in _ROW_DTYPES if unit % w == 0)
        dtype = getattr(torch, dtype_name)
        self._src, self._dst = src, dst
        self._src_rows = src.view(dtype).view(-1, unit // width)
        self._dst_rows = dst.view(dtype).view(-1, unit // width)
        self._unit = unit
        self._step = max(1, chunk_bytes // unit)
        self._direct_bytes = direct_bytes
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, copies: Sequence[Copy]) -> int:
        """Copy ``copies`` (offsets and sizes in whole blocks); the bytes copied."""
        small = [c for c in copies if c.nbytes < self._direct_bytes]
        src, dst = self._src, self._dst
        with torch.inference_mode():
            for c in copies:
                if c.nbytes >= self._direct_bytes:
                    dst[c.dst:c.dst + c.nbytes].copy_(src[c.src:c.src + c.nbytes])
            if small:
                self._gather(small)
        for tensor in (src, dst):  # landed means landed, on every stream
            _synchronize(tensor)
        return sum(c.nbytes for c in copies)

    def _gather(self, copies: Sequence[Copy]) -> None:
        src_rows = self._rows(copies, "src").to(self._src.device)
        dst_rows = self._rows(copies, "dst").to(self._dst.device)
        gathered, landing = self._buffers or self._allocate()
        for start in range(0, src_rows.numel(), self._step):
            end = min(start + self._step, src_rows.numel())
            out = gathered[:end - start]
            torch.index_select(self._src_rows, 0, src_rows[start:end], out=out)
            if landing is not gathered:  # another device: hop over first
                landing[:end - start].copy_(out)
            self._dst_rows.index_copy_(0, dst_rows[start:end], landing[:end - start])

    def _rows(self, copies: Sequence[Copy], side: str) -> torch.Tensor:
        starts = torch.tensor([getattr(c, side) // self._unit for c in copies], dtype=torch.int64)
        counts = torch.tensor([c.nbytes // self._unit for c in copies], dtype=torch.int64)
        first = torch.repeat_interleave(starts - (counts.cumsum(0) - counts), counts)
        return first + torch.arange(first.numel())

    def _allocate(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._src_rows
        shape = (self._step, rows.shape[1])
        gathered = torch.empty(shape, dtype=rows.dtype, device=rows.device)
        landing = gathered if rows.device == self._dst.device else torch.empty(
            shape, dtype=rows.dtype, device=self._dst.device)
        self._buffers = gathered, landing
        return self._buffers


def host_memory(flat: torch.Tensor) -> memoryview:
    """A writable byte view of a flat ``uint8`` host tensor (no copy; it keeps it alive)."""
    array: Any = flat.numpy()
    return memoryview(array)


async def on_torch_thread(context: TransportContext, fn: Callable[[], T]) -> T:
    """``fn()`` on the engine's torch thread, or inline where the context has none (tests)."""
    if context.on_torch_thread is None:
        return fn()
    result: T = await context.on_torch_thread(fn)
    return result


def boot_id() -> str:
    """This host's boot id: two engines with the same one share a kernel (and its memory)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


class PoolWindow:
    """Host memory a socket reads a pool's ranges from or receives them into.

    Unstaged (a pool in host memory), the views are the pool's own bytes: no copy at all.
    Staged (a pool on a device), ranges travel at most ``stage_bytes`` at a time through one
    host buffer (pinned for CUDA), gathered from the pool or scattered into it on the torch
    thread, with one synchronisation per chunk. Use one window per connection.
    """

    def __init__(self, pool: torch.Tensor, context: TransportContext, *, staged: bool,
                 stage_bytes: int = STAGE_BYTES) -> None:
        self._flat = pool_bytes(pool)
        self._context = context
        self.staged = staged
        self._stage_bytes = stage_bytes
        self._direct = None if staged else host_memory(self._flat)
        self._stage: tuple[torch.Tensor, memoryview] | None = None

    def chunks(self, ranges: Sequence[Range]) -> list[list[Range]]:
        """``ranges`` in the pieces one window holds: all at once unstaged, else split so
        that each piece fits the stage buffer."""
        if not self.staged:
            return [list(ranges)]
        chunks: list[list[Range]] = [[]]
        room = self._stage_bytes
        for offset, nbytes in ranges:
            while nbytes:
                if room == 0:
                    chunks.append([])
                    room = self._stage_bytes
                take = min(nbytes, room)
                chunks[-1].append((offset, take))
                offset, nbytes, room = offset + take, nbytes - take, room - take
        return [chunk for chunk in chunks if chunk]

    async def read(self, chunk: Sequence[Range]) -> list[memoryview]:
        """Views holding ``chunk``'s bytes, in order (staged: copied out of the pool first)."""
        if self._direct is not None:
            return self.landing(chunk)
        stage, view = self._staging()
        flat = self._flat

        def gather() -> None:
            position = 0
            for offset, nbytes in chunk:
                stage[position:position + nbytes].copy_(flat[offset:offset + nbytes],
                                                        non_blocking=True)
                position += nbytes
            _synchronize(flat)

        await on_torch_thread(self._context, gather)
        return [view[:sum(n for _, n in chunk)]]

    def landing(self, chunk: Sequence[Range]) -> list[memoryview]:
        """Views to receive ``chunk``'s bytes into, in order; :meth:`land` them afterwards."""
        if self._direct is not None:
            direct = self._direct
            return [direct[offset:offset + nbytes] for offset, nbytes in chunk]
        return [self._staging()[1][:sum(n for _, n in chunk)]]

    async def land(self, chunk: Sequence[Range]) -> None:
        """Move received bytes into the pool (staged only: unstaged they are there already)."""
        if self._direct is not None:
            return
        stage, flat = self._staging()[0], self._flat

        def scatter() -> None:
            position = 0
            for offset, nbytes in chunk:
                flat[offset:offset + nbytes].copy_(stage[position:position + nbytes],
                                                   non_blocking=True)
                position += nbytes
            _synchronize(flat)

        await on_torch_thread(self._context, scatter)

    def _staging(self) -> tuple[torch.Tensor, memoryview]:
        if self._stage is None:
            size = min(self._stage_bytes, self._flat.numel())
            stage = torch.empty(size, dtype=torch.uint8, pin_memory=self._flat.is_cuda)
            self._stage = stage, host_memory(stage)
        return self._stage


def _synchronize(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


async def send_all(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                   views: Sequence[memoryview]) -> None:
    """Send every view, about ``BATCH_BYTES`` of them per ``sendmsg`` call."""
    await _stream(loop, sock, views, receive=False)


async def recv_all(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                   views: Sequence[memoryview]) -> None:
    """Fill every view, about ``BATCH_BYTES`` per ``recvmsg_into`` call; :class:`ConnectionError`
    when the peer closes first."""
    await _stream(loop, sock, views, receive=True)


async def recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    """The next ``n`` bytes (:class:`ConnectionError` when the peer closes first)."""
    buffer = bytearray(n)
    await recv_all(loop, sock, [memoryview(buffer)])
    return bytes(buffer)


async def _stream(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                  views: Sequence[memoryview], *, receive: bool) -> None:
    # Each call moves what the socket buffer takes of about BATCH_BYTES of views, so a write
    # of thousands of ranges costs a few system calls per buffer-full, not one per range.
    pending = [view for view in views if view.nbytes]  # an empty read would wait for data
    first, end = 0, len(pending)
    while first < end:
        last, size = first, 0
        while last < end and size < BATCH_BYTES and last - first < IOV_MAX:
            size += pending[last].nbytes
            last += 1
        try:
            done = (sock.recvmsg_into(pending[first:last])[0] if receive
                    else sock.sendmsg(pending[first:last]))
        except (BlockingIOError, InterruptedError):
            await _ready(loop, sock, receive)
            continue
        if receive and done == 0:
            raise ConnectionError("the peer closed the connection")
        while first < end and done >= pending[first].nbytes:
            done -= pending[first].nbytes
            first += 1
        if done:
            pending[first] = pending[first][done:]


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, readable: bool) -> None:
    ready = loop.create_future()
    fd = sock.fileno()
    add, remove = ((loop.add_reader, loop.remove_reader) if readable
                   else (loop.add_writer, loop.remove_writer))
    add(fd, _settle, ready)
    try:
        await ready
    finally:
        remove(fd)


def _settle(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
