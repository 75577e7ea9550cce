"""KV transport throughput by block size: ``ipc`` against memcpy, ``tcp`` against a raw socket.

    python benchmarks/transports.py [--quick] [--mib 64] [--repeats 15] [--layers 8]
                                    [--patterns random,runs]

For each block size (``block_bytes``, one layer's K of one block: 16 KiB to 1 MiB) one write
moves ``--mib`` MiB, every layer: ``random`` blocks on both sides (one range per block, layer
and K/V, the plan's worst case) and ``runs`` (one run each side: one range per layer and K/V).

* ``ipc``: a receiver in another process (``tests/plugins/transports/peer.py``) exposes its
  memfd pool; this process maps it and writes. As in an engine, every torch call of this
  process runs on the one torch thread (``fdcore.engine.torch_thread``): a second OpenMP team
  (say, filling a pool on the main thread) makes every copy pay for it. ``memcpy`` is one
  ``copy_`` of the same number of bytes between two tensors of this process (the ceiling: no
  ranges, no second process).
* ``tcp``: a receiver in another process lands the write in its pool. ``raw`` is the same
  bytes as one contiguous buffer over a plain loopback socket, ``sendall`` here and
  ``recv_into`` there (the peer's ``raw`` mode), with a one-byte answer.

Each pair (memcpy and ipc, then raw and tcp) is timed in turns; each figure is the median of
``--repeats`` turns after two untimed ones (which map and fault the pages in). GiB/s counts
the payload bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import socket
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the peer lives in tests/

from fdcore.engine.disagg.transports import on_torch_thread
from fdcore.kv import KVLayout, plan_copies
from tests.plugins.transports.peer import Peer, build

BLOCK_KIB = (16, 64, 256, 1024)
HEADS, HEAD_DIM = 8, 64  # float32: 2 KiB a token per layer's K


def layout_for(block_kib: int, layers: int, mib: int) -> tuple[KVLayout, int]:
    """A layout with blocks of ``block_kib`` KiB and how many blocks one write of ``mib`` moves."""
    block_size = block_kib * 1024 // (HEADS * HEAD_DIM * 4)
    blocks = max(1, mib * 2**20 // (2 * layers * block_kib * 1024))
    layout = KVLayout(num_layers=layers, num_blocks=2 * blocks, kv_heads=HEADS,
                      block_size=block_size, head_dim=HEAD_DIM)
    return layout, blocks


class Timings:
    """Wall times of named runs, taken in turns so that drift on a shared machine hits the
    runs compared alike."""

    def __init__(self, runs: dict[str, Callable[[], Awaitable[Any]]]) -> None:
        self.runs = runs
        self.times: dict[str, list[float]] = {}

    async def take(self, repeats: int, warmup: int = 2) -> dict[str, float]:
        """The median seconds of each run over ``repeats`` turns, after ``warmup`` untimed
        ones (which map and fault the pages in)."""
        for turn in range(warmup + repeats):
            for name, run in self.runs.items():
                start = time.perf_counter()
                await run()
                if turn >= warmup:
                    self.times.setdefault(name, []).append(time.perf_counter() - start)
        return {name: statistics.median(times) for name, times in self.times.items()}


async def transport_link(stack: AsyncExitStack, name: str, layout: KVLayout) -> Any:
    """A link from a sender in this process to a ``name`` receiver in another."""
    sender = build(name, layout, "cpu")
    await on_torch_thread(lambda: sender.context.pool.copy_(torch.randn(layout.shape)))
    sender.context.on_torch_thread = on_torch_thread
    await sender.start()
    stack.push_async_callback(sender.stop)
    peer = await stack.enter_async_context(Peer(name, layout))
    return await sender.connect(peer.handle)


async def memcpy_run(nbytes: int) -> Callable[[], Awaitable[Any]]:
    """One ``copy_`` of ``nbytes`` between two tensors, on the torch thread."""
    src = await on_torch_thread(lambda: torch.randn(nbytes // 4).view(torch.uint8))
    dst = torch.empty_like(src)
    return lambda: on_torch_thread(lambda: dst.copy_(src))


async def raw_run(stack: AsyncExitStack, layout: KVLayout,
                  nbytes: int) -> Callable[[], Awaitable[Any]]:
    """``nbytes`` as one buffer over a plain loopback socket to a peer process."""
    payload = memoryview(bytearray(b"\x5a" * nbytes))
    peer = await stack.enter_async_context(Peer("raw", layout))
    sock = stack.enter_context(socket.create_connection((peer.handle["host"],
                                                         peer.handle["port"])))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def run() -> None:  # blocking on purpose: no event loop in the raw figure's way
        sock.sendall(struct.pack("!Q", nbytes))
        sock.sendall(payload)
        if sock.recv(1) != b"k":
            raise ConnectionError("the raw peer did not answer")

    return run


def block_ids(layout: KVLayout, blocks: int, pattern: str) -> tuple[list[int], list[int]]:
    """``random``: blocks drawn at random on both sides (one range per block, layer and K/V);
    ``runs``: one run on each side (one range per layer and K/V)."""
    if pattern == "runs":
        return list(range(blocks)), list(range(blocks, 2 * blocks))
    rng = random.Random(0)
    return (rng.sample(range(layout.num_blocks), blocks),
            rng.sample(range(layout.num_blocks), blocks))


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per block size and pattern."""
    rows = []
    for block_kib in BLOCK_KIB:
        layout, blocks = layout_for(block_kib, args.layers, args.mib)
        nbytes = blocks * 2 * args.layers * layout.block_bytes
        async with AsyncExitStack() as stack:
            ipc_link = await transport_link(stack, "ipc", layout)
            tcp_link = await transport_link(stack, "tcp", layout)
            raw = await raw_run(stack, layout, nbytes)
            memcpy = await memcpy_run(nbytes)
            for pattern in args.patterns:
                src, dst = block_ids(layout, blocks, pattern)
                # Copies and sockets apart: the torch thread's OpenMP team spins a while after
                # each copy, which took a core from the next socket run.
                seconds = {
                    **await Timings({"memcpy": memcpy, "ipc": partial(ipc_link.write, src, dst)}
                                    ).take(args.repeats),
                    **await Timings({"raw": raw, "tcp": partial(tcp_link.write, src, dst)}
                                    ).take(args.repeats)}
                ranges = len(plan_copies(layout, layout, src, dst))
                rows.append({"block": f"{block_kib} KiB", "pattern": pattern,
                             "ranges": ranges, "mib": nbytes / 2**20,
                             **{k: nbytes / v / 2**30 for k, v in seconds.items()}})
                print(f"  {block_kib} KiB {pattern}: done", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (GiB/s)."""
    lines = ["| block | blocks | ranges | MiB/write | memcpy GiB/s | ipc GiB/s | ipc/memcpy "
             "| raw socket GiB/s | tcp GiB/s | tcp/raw |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['pattern']} | {r['ranges']} | {r['mib']:.0f} "
                     f"| {r['memcpy']:.2f} | {r['ipc']:.2f} | {r['ipc'] / r['memcpy']:.0%} "
                     f"| {r['raw']:.2f} | {r['tcp']:.2f} | {r['tcp'] / r['raw']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    """Parse the command line, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="16 MiB writes, 5 repeats, random blocks only")
    parser.add_argument("--mib", type=int, default=64, help="MiB one write moves")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--patterns", default="random,runs", type=lambda v: v.split(","),
                        help="block patterns: random, runs (default both)")
    args = parser.parse_args()
    if args.quick:
        args.mib, args.repeats, args.patterns = 16, 5, ["random"]
    rows = asyncio.run(measure(args))
    print(f"python benchmarks/transports.py {shlex.join(sys.argv[1:])}".rstrip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs, {args.layers} layers, median of {args.repeats} turns")
    print(table(rows))


if __name__ == "__main__":
    main()
