"""A KV-transport receiver in a process of its own, for tests and benchmarks.

    python tests/plugins/transports/peer.py ipc|tcp|raw LAYOUT_JSON [--device cpu|cuda]

It allocates a zeroed pool of ``LAYOUT_JSON`` (``KVLayout`` fields) through the transport (or
on ``--device``), starts it and prints its handle as one line of base64 msgpack. Then it reads
commands on stdin, one a line, answering each with one line:

* ``hash`` or ``hash 3,5,9``: the sha256 of the whole pool's bytes, or of those blocks (every
  layer, K and V);
* ``stop``: stops the transport and answers ``stopped`` (so does the end of stdin, silently).

``raw`` is no transport: a plain loopback socket that reads messages of an 8-byte length and
that many bytes into one buffer with ``recv_into``, answering each with one byte, the ceiling
``benchmarks/transports.py`` holds ``tcp`` against. :class:`Peer` runs this script from a test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import json
import random
import socket
import struct
import sys
import threading
from types import TracebackType
from typing import Any

import msgpack
import torch
from fdcore_plugins.transports import ipc, tcp

from fdcore.kv import KVLayout
from fdcore.types import TransportContext

TRANSPORTS: dict[str, Any] = {"ipc": ipc.IpcTransport, "tcp": tcp.TcpTransport}


def build(name: str, layout: KVLayout, device: str) -> Any:
    """The transport ``name`` (an ``IpcTransport`` or a ``TcpTransport``) with its pool
    allocated and set, as an engine would."""
    cls = TRANSPORTS[name]
    transport = cls(cls.Config(), TransportContext(layout, device=device))
    pool = transport.allocate(layout)
    if pool is None:
        pool = torch.zeros(layout.shape, dtype=getattr(torch, layout.dtype), device=device)
    transport.context.layout, transport.context.pool = layout, pool
    return transport


def write_cases(layout: KVLayout, seeds: int = 6) -> list[tuple[list[int], list[int],
                                                                list[int] | None]]:
    """``(src_ids, dst_ids, layers)`` writes for ``layout``: runs on both sides, on one side
    only, single blocks, then random ones (random layer subsets, runs where they fall)."""
    n = layout.num_blocks
    cases: list[tuple[list[int], list[int], list[int] | None]] = [
        (list(range(4)), list(range(n - 4, n)), None),
        ([3, 1, 2], [0, 1, 2], [layout.num_layers - 1]),
        ([5], [5], [0]),
        ([0, 1, 7, 8, 9], [9, 10, 2, 3, 4], None),
    ]
    for seed in range(seeds):
        rng = random.Random(seed)
        k = rng.randint(1, n)
        src, dst = rng.sample(range(n), k), rng.sample(range(n), k)
        if seed % 2:
            src, dst = sorted(src), sorted(dst)  # long runs on both sides
        layers = None if seed % 3 == 0 else sorted(
            rng.sample(range(layout.num_layers), rng.randint(1, layout.num_layers)))
        cases.append((src, dst, layers))
    return cases


def landed(before: torch.Tensor, src: torch.Tensor, src_ids: list[int], dst_ids: list[int],
           layers: list[int] | None = None) -> torch.Tensor:
    """What a receiver's pool ``before`` must hold after a write of ``src``'s blocks."""
    after = before.clone()
    for layer in range(before.shape[0]) if layers is None else layers:
        after[layer][:, dst_ids] = src[layer][:, src_ids].to(after.device)
    return after


def digest(pool: torch.Tensor, blocks: list[int] | None = None) -> str:
    """sha256 of the pool's bytes (or of ``blocks`` in every layer, K and V)."""
    chosen = pool if blocks is None else pool[:, :, blocks]
    return hashlib.sha256(chosen.contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


def say(line: str) -> None:
    """One line to the parent."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def serve(name: str, layout: KVLayout, device: str) -> None:
    """Receive until ``stop`` or the end of stdin."""
    transport = build(name, layout, device)
    await transport.start()
    pool = transport.context.pool
    say(base64.b64encode(msgpack.packb(await transport.expose())).decode())
    try:
        while line := (await asyncio.to_thread(sys.stdin.readline)).strip():
            command, _, arg = line.partition(" ")
            if command == "hash":
                say(digest(pool, [int(b) for b in arg.split(",")] if arg else None))
            elif command == "stop":
                await transport.stop()
                say("stopped")
                return
            else:
                say(f"unknown command {command!r}")
    finally:
        await transport.stop()


def serve_raw(nbytes: int) -> None:
    """The plain socket receiver: one connection at a time, messages into one buffer."""
    listener = socket.create_server(("127.0.0.1", 0))
    say(base64.b64encode(msgpack.packb({"host": "127.0.0.1",
                                        "port": listener.getsockname()[1]})).decode())
    buffer = memoryview(bytearray(nbytes))

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                while head := conn.recv(8, socket.MSG_WAITALL):
                    (size,) = struct.unpack("!Q", head)
                    view = buffer[:size]
                    while view.nbytes:
                        view = view[conn.recv_into(view):]
                    conn.sendall(b"k")

    threading.Thread(target=accept, daemon=True).start()
    while sys.stdin.readline().strip() not in ("", "stop"):
        say("unknown command")


class Peer:
    """This script as a child process: ``async with Peer("ipc", layout) as peer`` gives its
    ``handle``; :meth:`ask` sends a command and returns the answer line. Every read has a
    deadline, so a peer that dies fails the test instead of hanging it."""

    def __init__(self, transport: str, layout: KVLayout, device: str = "cpu",
                 deadline: float = 120.0) -> None:
        self.argv = [sys.executable, __file__, transport,
                     json.dumps(dataclasses.asdict(layout)), "--device", device]
        self.deadline = deadline
        self.handle: dict[str, Any] = {}
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Peer:
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self.handle = msgpack.unpackb(base64.b64decode(await self._line()))
        return self

    async def ask(self, command: str) -> str:
        """Send ``command`` and return the peer's answer."""
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(command.encode() + b"\n")
        await self._proc.stdin.drain()
        return await self._line()

    async def _line(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), self.deadline)
        if not line:
            raise ConnectionError(f"the peer exited ({await self._proc.wait()})")
        return line.decode().strip()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), self.deadline)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def main() -> None:
    """Parse the command line and receive."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("transport", choices=[*TRANSPORTS, "raw"])
    parser.add_argument("layout", help="the pool's KVLayout fields as JSON")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    layout = KVLayout(**json.loads(args.layout))
    if args.transport == "raw":
        serve_raw(layout.pool_bytes)
    else:
        asyncio.run(serve(args.transport, layout, args.device))


if __name__ == "__main__":
    main()
