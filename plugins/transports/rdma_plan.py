"""Block ids to RDMA WRITE work requests, in chains (no verbs needed: every branch testable).

:func:`fdcore.kv.plan_copies` gives the fewest contiguous ``(src, dst, nbytes)`` ranges; each
becomes one work request reading ``local.addr + src`` under ``local.key`` (the lkey) and
writing ``remote.addr + dst`` under ``remote.key`` (the receiver's rkey), split where a range
is longer than one message may be. Requests go out in chains of at most ``max_chain``, one
``ibv_post_send`` each, and only a chain's last request is signalled: an RC queue pair
completes its requests in order, so that one completion says the whole chain landed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fdcore.kv import KVLayout, plan_copies

# The most bytes one request carries unless the port says less (an SGE length is 32 bits,
# and ports commonly advertise 2 GiB).
MAX_MESSAGE = 1 << 30


@dataclass(frozen=True, slots=True)
class Region:
    """A registered memory region: base address, length and key (lkey or rkey)."""

    addr: int
    nbytes: int
    key: int


@dataclass(frozen=True, slots=True)
class WorkRequest:
    """One RDMA WRITE: ``length`` bytes from ``local_addr`` to ``remote_addr``."""

    local_addr: int
    remote_addr: int
    length: int
    lkey: int
    rkey: int
    signalled: bool


@dataclass(frozen=True, slots=True)
class Chain:
    """Work requests posted together; ``wr_id`` comes back in the last one's completion."""

    wr_id: int
    requests: tuple[WorkRequest, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the chain writes."""
        return sum(request.length for request in self.requests)


def plan_writes(
    src: KVLayout, dst: KVLayout, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
    layers: Sequence[int] | None = None, *, local: Region, remote: Region, max_chain: int,
    max_message: int = MAX_MESSAGE,
) -> list[Chain]:
    """The chains that write ``src_block_ids[i]`` of ``local`` into ``dst_block_ids[i]`` of
    ``remote`` for every layer (or ``layers``), K and V.

    Raises :class:`ValueError` for what :func:`~fdcore.kv.plan_copies` refuses (layouts that
    differ, bad block ids), a region smaller than its layout's pool, or a ``max_chain`` or
    ``max_message`` under 1.
    """
    if max_chain < 1 or max_message < 1:
        raise ValueError(f"max_chain ({max_chain}) and max_message ({max_message}) must be at "
                         "least 1")
    copies = plan_copies(src, dst, src_block_ids, dst_block_ids, layers)
    for layout, region, side in ((src, local, "local"), (dst, remote, "remote")):
        if region.nbytes < layout.pool_bytes:
            raise ValueError(f"the {side} registered pool is {region.nbytes} bytes, its layout "
                             f"needs {layout.pool_bytes}")
    pieces = [
        (copy.src + at, copy.dst + at, min(max_message, copy.nbytes - at))
        for copy in copies for at in range(0, copy.nbytes, max_message)
    ]
    chains: list[Chain] = []
    for first in range(0, len(pieces), max_chain):
        batch = pieces[first:first + max_chain]
        requests = tuple(
            WorkRequest(local.addr + s, remote.addr + d, n, local.key, remote.key,
                        signalled=i == len(batch) - 1)
            for i, (s, d, n) in enumerate(batch)
        )
        chains.append(Chain(len(chains), requests))
    return chains
