"""``ipc``: KV blocks between two engines on one host, by shared memory.

* CPU: the engine's KV pool *is* shared memory. :meth:`IpcTransport.allocate` makes it in an
  anonymous memory file (``memfd``) and a peer opens it as ``/proc/<pid>/fd/<n>``: a memfd has
  no name in ``/dev/shm``, so an engine killed with ``kill -9`` leaves nothing behind, and the
  memory lives exactly as long as some process maps it. Where ``memfd_create`` is refused, the
  file is a uniquely named one in ``/dev/shm``, unlinked at :meth:`IpcTransport.stop`. The
  sender maps the receiver's pool and copies its blocks in on its torch thread.
* CUDA: the pool stays where the engine allocated it; :meth:`IpcTransport.expose` exports its
  CUDA IPC handle once, a sender opens it and copies device to device on its torch thread.

Both engines must share a kernel: the handle carries the host and its boot id, and a sender
elsewhere refuses it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import fdcore
from fdcore.bases import BaseTransport
from fdcore.kv import KVLayout, plan_copies
from fdcore.lazy import lazy_module
from fdcore.registry import Register
from fdcore.types import EmptyConfig, TransportContext

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

from .pool_access import (
    BlockCopier,
    boot_id,
    check_writable,
    layout_dict,
    layout_of,
    on_torch_thread,
    pool_bytes,
)

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class SharedFile:
    """One engine's pool file in memory, mapped here and opened by peers through ``path``."""

    def __init__(self, nbytes: int) -> None:
        self.unlink: str | None = None
        try:
            self.fd = os.memfd_create("fdcore-kv-pool", os.MFD_CLOEXEC)
            self.path = f"/proc/{os.getpid()}/fd/{self.fd}"
        except (AttributeError, OSError):  # no memfd here (old kernel, seccomp): a named file
            self.path = self.unlink = f"/dev/shm/fdcore-kv-{os.getpid()}-{secrets.token_hex(8)}"
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                              0o600)
        try:
            os.ftruncate(self.fd, nbytes)  # a new file reads as zeros: the pool starts zeroed
            self.identity = _identity(self.fd)
            self.tensor = _map(self.fd, nbytes)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the file (idempotent); mappings, this engine's pool among them, stay valid."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.unlink is not None:
            os.unlink(self.unlink)
            self.unlink = None


def _identity(fd: int) -> list[int]:
    stat = os.fstat(fd)
    return [stat.st_dev, stat.st_ino]


def _map(fd: int, nbytes: int) -> torch.Tensor:
    return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)


class IpcLink:
    """A sender's mapping of one receiver's pool (flat bytes, host or CUDA memory)."""

    def __init__(self, transport: IpcTransport, remote: KVLayout, dst: torch.Tensor) -> None:
        self.transport = transport
        self.remote = remote
        self._copier: BlockCopier | None = BlockCopier(
            pool_bytes(transport.context.pool), dst, remote.block_bytes)

    async def write(
        self, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
        layers: Sequence[int] | None = None, *, transfer_id: str = "",
    ) -> int:
        """Copy the blocks into the receiver's pool on the torch thread; the bytes moved."""
        copier = self._copier
        if copier is None:
            raise RuntimeError("ipc: the link is closed")
        context = self.transport.context
        local = check_writable("ipc", context, self.remote)
        # Planned in full, then copied: on 2 CPUs the copy's OpenMP team keeps both busy, and
        # planning the next layers meanwhile measured no faster.
        copies = plan_copies(local, self.remote, src_block_ids, dst_block_ids, layers)
        return await on_torch_thread(context, partial(copier, copies))

    async def close(self) -> None:
        """Drop the mapping (idempotent)."""
        self._copier = None
        self.transport.links.discard(self)


class IpcTransport(BaseTransport[EmptyConfig]):
    """Shared-memory KV transport for engines on one host (a CPU memfd pool or CUDA IPC)."""

    name = "ipc"

    def __init__(self, config: EmptyConfig, context: TransportContext) -> None:
        super().__init__(config, context)
        self._file: SharedFile | None = None
        self._cuda: list[Any] | None = None
        self.links: set[IpcLink] = set()

    def allocate(self, layout: KVLayout) -> torch.Tensor | None:
        """On CPU, the pool in shared memory (zeroed); on a device, nothing (the engine
        allocates there and :meth:`expose` exports it)."""
        if self.context.device != "cpu":
            return None
        if self._file is not None:
            raise RuntimeError("ipc: the KV pool is allocated already")
        self._file = SharedFile(layout.pool_bytes)
        return self._file.tensor.view(getattr(torch, layout.dtype)).view(layout.shape)

    async def expose(self) -> dict[str, Any]:
        """The pool's handle: its file (CPU) or CUDA IPC handle, layout, host and boot id."""
        pool, layout = self.context.pool, self.context.layout
        if pool is None or layout is None:
            raise RuntimeError("ipc: the KV pool is not allocated yet")
        handle: dict[str, Any] = {"host": self.context.host, "boot_id": boot_id(),
                                  "pid": os.getpid(), "layout": layout_dict(layout),
                                  "nbytes": layout.pool_bytes}
        if pool.is_cuda:
            if self._cuda is None:  # once: every export creates a new IPC event
                self._cuda = list(pool.untyped_storage()._share_cuda_())
            return {**handle, "kind": "cuda", "cuda": self._cuda,
                    "offset": pool.storage_offset() * pool.element_size()}
        if self._file is None or self._file.fd < 0:
            raise RuntimeError("ipc: a CPU pool must be allocated by ipc: the engine's pool is "
                               "not in shared memory (another transport allocated it?)")
        return {**handle, "kind": "cpu", "path": self._file.path,
                "identity": self._file.identity}

    async def connect(self, handle: Mapping[str, Any]) -> IpcLink:
        """Map the pool behind ``handle`` (same host only; layouts must match)."""
        theirs = handle.get("host")
        if (theirs != self.context.host and theirs not in LOOPBACK) or (
                handle.get("boot_id") != boot_id()):
            raise ValueError(f"ipc needs both engines on one host: the receiver's pool is on "
                             f"{theirs!r} (boot id {handle.get('boot_id')!r}), this engine on "
                             f"{self.context.host!r} (boot id {boot_id()!r})")
        remote = layout_of(handle)
        check_writable("ipc", self.context, remote)
        kind = handle.get("kind")
        if kind == "cpu":
            dst = _open_file(handle, remote.pool_bytes)
        elif kind == "cuda":
            dst = _open_cuda(handle, remote.pool_bytes)
        else:
            raise ValueError(f"ipc: unknown handle kind {kind!r}")
        link = IpcLink(self, remote, dst)
        self.links.add(link)
        return link

    async def stop(self) -> None:
        """Drop every link's mapping and close the pool's file (idempotent). The pool tensor
        itself stays valid for the engine; the memory goes with the last mapping."""
        for link in list(self.links):
            await link.close()
        if self._file is not None:
            self._file.close()


def _open_file(handle: Mapping[str, Any], nbytes: int) -> torch.Tensor:
    path = handle.get("path")
    if not isinstance(path, str):
        raise ValueError("ipc: the handle has no path")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ConnectionError(f"ipc: cannot open the receiver's pool {path} ({exc.strerror}); "
                              "it has stopped, or runs as another user") from None
    try:
        # A pid's fd number is reused once the receiver closes it: check it is still the pool.
        if _identity(fd) != handle.get("identity"):
            raise ConnectionError(f"ipc: {path} is no longer the receiver's pool (it stopped)")
        if os.fstat(fd).st_size < nbytes:
            raise ValueError(f"ipc: the receiver's pool file is smaller than its layout's "
                             f"{nbytes} bytes")
        return _map(fd, nbytes)
    finally:
        os.close(fd)


def _open_cuda(handle: Mapping[str, Any], nbytes: int) -> torch.Tensor:
    if not torch.cuda.is_available():
        raise RuntimeError("ipc: the receiver's pool is on a CUDA device and this engine "
                           "has none")
    args, offset = handle.get("cuda"), handle.get("offset", 0)
    if not isinstance(args, list) or len(args) != 8 or not isinstance(offset, int):
        raise ValueError("ipc: malformed CUDA handle")
    # The arguments torch.multiprocessing's rebuild_cuda_tensor passes: device, memory handle,
    # storage bytes and offset, ref-counter handle and offset, event handle, event sync flag.
    storage = torch.UntypedStorage._new_shared_cuda(*args)
    flat = torch.empty(0, dtype=torch.uint8, device=storage.device)
    return flat.set_(storage, offset, (nbytes,), (1,))


@fdcore.hookimpl
def fdcore_register_transports(register: Register) -> None:
    """Register ``ipc``."""
    register.add_transport(IpcTransport)
