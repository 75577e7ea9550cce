"""The verbs the ``rdma`` transport uses, over pyverbs: the only module that imports it, and
only when :func:`load` is called (importing this module needs nothing).

pyverbs objects hold C resources; :class:`Device` and :class:`QueuePair` close each one once,
dependants before what they depend on (queue pairs, then the MR, the CQs, the PD, the
context). pyverbs ships without type information, so its objects are ``Any`` here.
"""

from __future__ import annotations

import importlib
import itertools
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fdcore.errors import StartupError
from fdcore.kv import KVLayout

from .rdma_plan import Chain, Region
from .rdma_wire import PSN_MASK, Hello

INSTALL_HINT = ("install Debian's python3-pyverbs (`apt-get install python3-pyverbs`), then run "
                "`make pyverbs` to make it importable in the virtualenv")
_MODULES = ("device", "pd", "mr", "cq", "qp", "wr", "addr", "enums", "pyverbs_error")
# Chains posted before the oldest one's completion is awaited: the next chain is on the wire
# while the previous one's completion is polled.
CHAINS_IN_FLIGHT = 2
# Empty polls before the poller starts sleeping between polls: a spinning thread holds the GIL
# and would starve the event loop (and the torch thread) for the whole transfer.
_SPINS = 200
_BACKOFF_SECS = 20e-6
# RC retry settings as in ibv_rc_pingpong: about 67 ms per ack timeout, 7 retries.
_ACK_TIMEOUT, _RETRIES, _RNR_TIMER = 14, 7, 12


class RdmaError(RuntimeError):
    """A verbs call or a work request failed."""


@dataclass(frozen=True, slots=True)
class Verbs:
    """The pyverbs modules, imported."""

    device: Any
    pd: Any
    mr: Any
    cq: Any
    qp: Any
    wr: Any
    addr: Any
    enums: Any
    pyverbs_error: Any


def load() -> Verbs:
    """Import pyverbs; raise :class:`StartupError` saying how to install it when it is
    missing."""
    try:
        modules = [importlib.import_module(f"pyverbs.{name}") for name in _MODULES]
    except ImportError as exc:
        raise StartupError(f"rdma: pyverbs is not importable ({exc}): {INSTALL_HINT}") from None
    return Verbs(*modules)


def pool_memory(pool: Any, layout: KVLayout) -> tuple[int, int]:
    """``(address, bytes)`` of the engine's pool tensor, checked to be whole and large enough."""
    if pool is None:
        raise StartupError("rdma: the engine set no KV pool (TransportContext.pool) before "
                           "start()")
    if pool.storage_offset() != 0 or not pool.is_contiguous():
        raise StartupError("rdma: the KV pool must be one whole contiguous tensor")
    nbytes = int(pool.untyped_storage().nbytes())
    if nbytes < layout.pool_bytes:
        raise StartupError(f"rdma: the KV pool is {nbytes} bytes, its layout needs "
                           f"{layout.pool_bytes}")
    return int(pool.data_ptr()), nbytes


def device_names(verbs: Verbs) -> list[str]:
    """The RDMA devices on this host (none where the kernel has no RDMA support, for which
    libibverbs fails rather than answering an empty list)."""
    try:
        devices = verbs.device.get_device_list()
    except verbs.pyverbs_error.PyverbsError:
        return []
    return [dev.name.decode() for dev in devices]


def gid_text(gid: bytes) -> str:
    """``gid`` in pyverbs's ``xxxx:xxxx:...`` form (eight groups of four hex digits)."""
    return ":".join(gid[i:i + 2].hex() for i in range(0, 16, 2))


class Device:
    """One opened device port: its context, protection domain, the CQ that receiving queue
    pairs share (they never complete anything) and the KV pool, registered for local and
    remote writes (:attr:`pool` carries its lkey, :attr:`rkey` is for peers)."""

    def __init__(self, verbs: Verbs, name: str, ib_port: int, gid_index: int,
                 pool: tuple[int, int]) -> None:
        found = device_names(verbs)
        if not found:
            raise StartupError("rdma: no RDMA device (pyverbs.device.get_device_list() found "
                               "none)")
        if name and name not in found:
            raise StartupError(f"rdma: no RDMA device {name!r} (found: {', '.join(found)})")
        self.verbs = verbs
        self.name = name or found[0]
        self.ib_port = ib_port
        self.gid_index = gid_index
        self._opened: list[Any] = []
        try:
            self._open()
            self._register(*pool)
        except verbs.pyverbs_error.PyverbsError as exc:
            self.close()
            raise StartupError(f"rdma: opening {self.name} port {ib_port}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        v, e = self.verbs, self.verbs.enums
        self.context = self._keep(v.device.Context(name=self.name))
        port = self.context.query_port(self.ib_port)
        if port.state != e.IBV_PORT_ACTIVE:
            raise StartupError(f"rdma: {self.name} port {self.ib_port} is not active (state "
                               f"{e.ibv_port_state(port.state).name})")
        self.lid: int = port.lid
        self.active_mtu: int = int(port.active_mtu)
        self.max_message: int = port.max_msg_sz
        gid = str(self.context.query_gid(self.ib_port, self.gid_index))
        self.gid = bytes.fromhex(gid.replace(":", ""))
        self.pd = self._keep(v.pd.PD(self.context))
        self.passive_cq = self._keep(v.cq.CQ(self.context, 1))

    def _register(self, addr: int, nbytes: int) -> None:
        e = self.verbs.enums
        try:
            mr = self._keep(self.verbs.mr.MR(self.pd, nbytes, e.IBV_ACCESS_LOCAL_WRITE
                                             | e.IBV_ACCESS_REMOTE_WRITE, address=addr))
        except self.verbs.pyverbs_error.PyverbsError as exc:
            raise StartupError(f"rdma: registering the KV pool ({nbytes} bytes at {addr:#x}) "
                               f"on {self.name}: {exc}") from None
        self.pool = Region(addr, nbytes, mr.lkey)
        self.rkey: int = mr.rkey

    def _keep(self, resource: Any) -> Any:
        self._opened.append(resource)
        return resource

    def close(self) -> None:
        """Release the MR, CQ, PD and context, newest first, once."""
        while self._opened:
            self._opened.pop().close()


class QueuePair:
    """An RC queue pair, in INIT once built. A sender's has its own CQ and room for
    :data:`CHAINS_IN_FLIGHT` chains; a receiver's only ever answers incoming writes."""

    def __init__(self, device: Device, *, sender: bool, max_chain: int) -> None:
        v, e = device.verbs, device.verbs.enums
        self.device = device
        self.psn = secrets.randbits(24) & PSN_MASK
        self._ids = itertools.count(1)
        self._abandoned = threading.Event()
        depth = CHAINS_IN_FLIGHT * max_chain if sender else 1
        self.cq: Any = None
        self.qp: Any = None
        try:
            self.cq = v.cq.CQ(device.context, depth) if sender else None
            cq = self.cq or device.passive_cq
            cap = v.qp.QPCap(max_send_wr=depth, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
            init = v.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=0)
            attr = v.qp.QPAttr(port_num=device.ib_port)
            attr.pkey_index = 0
            attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | (0 if sender else
                                                               e.IBV_ACCESS_REMOTE_WRITE)
            self.qp = v.qp.QP(device.pd, init, attr)
        except v.pyverbs_error.PyverbsError as exc:
            self.close()
            raise RdmaError(f"rdma: creating a queue pair on {device.name}: {exc}") from None
        self.qp_num: int = self.qp.qp_num

    def connect(self, remote: Hello, path_mtu: int) -> None:
        """Move INIT -> RTR -> RTS towards ``remote``'s queue pair."""
        v, d = self.device.verbs, self.device
        attr = v.qp.QPAttr(port_num=d.ib_port, path_mtu=path_mtu)
        attr.dest_qp_num = remote.qp_num
        attr.rq_psn = remote.psn
        attr.max_dest_rd_atomic = 1
        attr.min_rnr_timer = _RNR_TIMER
        attr.ah_attr = self._address(remote)
        attr.sq_psn = self.psn
        attr.timeout = _ACK_TIMEOUT
        attr.retry_cnt = _RETRIES
        attr.rnr_retry = _RETRIES
        attr.max_rd_atomic = 1
        try:
            self.qp.to_rtr(attr)
            self.qp.to_rts(attr)
        except v.pyverbs_error.PyverbsError as exc:
            raise RdmaError(f"rdma: connecting queue pair {self.qp_num} to "
                            f"{remote.qp_num}: {exc}") from None

    def _address(self, remote: Hello) -> Any:
        addr, d = self.device.verbs.addr, self.device
        if not any(remote.gid):  # InfiniBand without a GRH: the LID alone routes
            return addr.AHAttr(dlid=remote.lid, port_num=d.ib_port)
        route = addr.GlobalRoute(dgid=addr.GID(gid_text(remote.gid)), sgid_index=d.gid_index,
                                 hop_limit=64)
        return addr.AHAttr(dlid=remote.lid, port_num=d.ib_port, is_global=1, gr=route)

    def run(self, chains: Sequence[Chain], deadline: float) -> None:
        """Post ``chains`` and wait for each one's completion (blocking: call it in a thread).

        Raises :class:`RdmaError` for a failed post or a completion with a bad status, and
        :class:`TimeoutError` when ``deadline`` (``time.monotonic()``) passes first.
        """
        pending: deque[int] = deque()
        for chain in chains:
            if len(pending) == CHAINS_IN_FLIGHT:
                self._wait(pending.popleft(), deadline)
            pending.append(self._post(chain))
        while pending:
            self._wait(pending.popleft(), deadline)

    def _post(self, chain: Chain) -> int:
        v, e = self.device.verbs, self.device.verbs.enums
        wr_id = next(self._ids)
        head: Any = None
        chained = []  # each request points into the next one's C struct: keep them all alive
        for request in reversed(chain.requests):
            sge = v.wr.SGE(request.local_addr, request.length, request.lkey)
            head = v.wr.SendWR(wr_id=wr_id, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[sge],
                               send_flags=e.IBV_SEND_SIGNALED if request.signalled else 0,
                               next_wr=head)
            head.set_wr_rdma(request.rkey, request.remote_addr)
            chained.append(head)
        try:
            self.qp.post_send(head)
        except v.pyverbs_error.PyverbsError as exc:
            raise RdmaError(f"rdma: posting {len(chained)} RDMA WRITEs: {exc}") from None
        return wr_id

    def _wait(self, wr_id: int, deadline: float) -> None:
        e = self.device.verbs.enums
        empty = 0
        while True:
            count, completions = self.cq.poll()
            if count:
                wc = completions[0]
                if wc.status != e.IBV_WC_SUCCESS:
                    raise RdmaError(f"rdma: RDMA WRITE failed: {status_name(e, wc.status)} "
                                    f"(vendor error {wc.vendor_err:#x})")
                if wc.wr_id != wr_id:
                    raise RdmaError(f"rdma: completion for work request {wc.wr_id}, "
                                    f"{wr_id} expected")
                return
            if self._abandoned.is_set():
                raise RdmaError("rdma: the link was closed mid-write")
            if time.monotonic() > deadline:
                raise TimeoutError("rdma: no completion before the write's deadline")
            empty += 1
            if empty > _SPINS:
                time.sleep(_BACKOFF_SECS)

    def abandon(self) -> None:
        """Make a :meth:`run` in progress stop waiting (the link is closing)."""
        self._abandoned.set()

    def close(self) -> None:
        """Destroy the queue pair, then its own CQ, once (no :meth:`run` may be running)."""
        qp, cq, self.qp, self.cq = self.qp, self.cq, None, None
        if qp is not None:
            qp.close()
        if cq is not None:
            cq.close()


def status_name(enums: Any, status: int) -> str:
    """``IBV_WC_...`` for a completion status (its number when pyverbs does not know it)."""
    try:
        return str(enums.ibv_wc_status(status).name)
    except ValueError:
        return f"status {status}"
