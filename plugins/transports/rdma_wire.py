"""The ``rdma`` handshake frames: what two engines exchange over TCP to connect queue pairs.

A frame is a fixed header, ``magic`` (``b"FDRV"``), ``version`` (u16), ``kind`` (u8) and the
body's length (u32), all big-endian, then the body. A :class:`Hello` body carries one side's
queue pair (number, first PSN), its port's address (LID, GID, active MTU), its registered pool
(rkey, address, bytes) and its KV layout; a refusal body is a UTF-8 reason. Every length is
checked before it is used: a truncated, oversized or foreign frame raises
:class:`HandshakeError` with what was wrong, never anything else.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fdcore.kv import KVLayout

MAGIC = b"FDRV"
VERSION = 1
HELLO_KIND = 1
REFUSAL_KIND = 2
MAX_MODEL = 4096
# A hello is at most about 4.2 KiB (with the longest model name); anything far larger is not ours.
MAX_BODY = 64 * 1024

HEADER = struct.Struct("!4sHBI")
# qp_num, psn, lid, gid, mtu, rkey, addr, nbytes, then the layout's five sizes.
_HELLO = struct.Struct("!IIH16sBIQQIIIII")
_SHORT_TEXT = struct.Struct("!B")
_TEXT = struct.Struct("!H")
PSN_MASK = (1 << 24) - 1
MTUS = range(1, 6)  # ibv_mtu: 1 (256 bytes) .. 5 (4096 bytes)


class HandshakeError(ValueError):
    """A handshake frame that cannot be read, or a peer that refused the connection."""


@dataclass(frozen=True, slots=True)
class Hello:
    """One side's half of a connection: its queue pair, port address and registered pool."""

    qp_num: int
    psn: int
    lid: int
    gid: bytes
    mtu: int
    rkey: int
    addr: int
    nbytes: int
    layout: KVLayout


def encode_hello(hello: Hello) -> bytes:
    """The frame that carries ``hello``."""
    lay = hello.layout
    dtype, model = lay.dtype.encode(), lay.model.encode()
    if len(hello.gid) != 16:
        raise HandshakeError(f"a GID is 16 bytes, not {len(hello.gid)}")
    if len(model) > MAX_MODEL:
        raise HandshakeError(f"the model name is over {MAX_MODEL} bytes")
    body = _HELLO.pack(
        hello.qp_num, hello.psn, hello.lid, hello.gid, hello.mtu, hello.rkey, hello.addr,
        hello.nbytes, lay.num_layers, lay.num_blocks, lay.kv_heads, lay.block_size,
        lay.head_dim,
    )
    body += _SHORT_TEXT.pack(len(dtype)) + dtype + _TEXT.pack(len(model)) + model
    return _frame(HELLO_KIND, body)


def encode_refusal(reason: str) -> bytes:
    """The frame that tells a peer why its connection was refused."""
    return _frame(REFUSAL_KIND, reason.encode()[:1024])


def parse_header(header: bytes) -> tuple[int, int]:
    """``(kind, body_length)`` of a frame's first :data:`HEADER` bytes, checked."""
    if len(header) < HEADER.size:
        raise HandshakeError(f"truncated handshake: {len(header)} bytes, the header needs "
                             f"{HEADER.size}")
    magic, version, kind, length = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise HandshakeError(f"not an fdcore rdma handshake (magic {magic!r}, expected "
                             f"{MAGIC!r})")
    if version != VERSION:
        raise HandshakeError(f"rdma handshake version {version}, this side speaks {VERSION}")
    if kind not in (HELLO_KIND, REFUSAL_KIND):
        raise HandshakeError(f"unknown rdma handshake frame kind {kind}")
    if length > MAX_BODY:
        raise HandshakeError(f"rdma handshake body of {length} bytes (at most {MAX_BODY})")
    return kind, length


def decode(frame: bytes) -> Hello:
    """The :class:`Hello` in ``frame``; a refusal raises :class:`HandshakeError` with its
    reason."""
    kind, length = parse_header(frame)
    body = frame[HEADER.size:]
    if len(body) != length:
        raise HandshakeError(f"rdma handshake body is {len(body)} bytes, its header says "
                             f"{length}")
    if kind == REFUSAL_KIND:
        raise HandshakeError(f"the peer refused the connection: "
                             f"{body.decode(errors='replace')}")
    return _decode_hello(body)


def layout_from_handle(value: Any) -> KVLayout:
    """The :class:`KVLayout` an exposed handle carries (its fields as a mapping)."""
    if not isinstance(value, Mapping):
        raise ValueError("rdma: the handle has no layout")
    try:
        return KVLayout(**value)
    except TypeError as exc:
        raise ValueError(f"rdma: the handle's layout: {exc}") from None


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One whole frame from ``reader`` (header checked before the body is read)."""
    try:
        header = await reader.readexactly(HEADER.size)
        _, length = parse_header(header)
        return header + await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise HandshakeError(f"the connection closed mid-handshake ({len(exc.partial)} "
                             "bytes of a part read)") from None


def _frame(kind: int, body: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, len(body)) + body


def _decode_hello(body: bytes) -> Hello:
    if len(body) < _HELLO.size:
        raise HandshakeError(f"truncated rdma hello: {len(body)} bytes, at least "
                             f"{_HELLO.size} needed")
    (qp_num, psn, lid, gid, mtu, rkey, addr, nbytes, num_layers, num_blocks, kv_heads,
     block_size, head_dim) = _HELLO.unpack_from(body)
    at = _HELLO.size
    dtype, at = _text(body, at, _SHORT_TEXT, "dtype")
    model, at = _text(body, at, _TEXT, "model")
    if at != len(body):
        raise HandshakeError(f"rdma hello has {len(body) - at} bytes after its end")
    if psn > PSN_MASK:
        raise HandshakeError(f"rdma hello PSN {psn} does not fit 24 bits")
    if mtu not in MTUS:
        raise HandshakeError(f"rdma hello MTU code {mtu} is not one of 1..5")
    try:
        layout = KVLayout(num_layers, num_blocks, kv_heads, block_size, head_dim, dtype, model)
    except ValueError as exc:
        raise HandshakeError(f"rdma hello layout: {exc}") from None
    return Hello(qp_num, psn, lid, gid, mtu, rkey, addr, nbytes, layout)


def _text(body: bytes, at: int, prefix: struct.Struct, name: str) -> tuple[str, int]:
    if len(body) < at + prefix.size:
        raise HandshakeError(f"truncated rdma hello: no length for its {name}")
    (size,) = prefix.unpack_from(body, at)
    start = at + prefix.size
    if len(body) < start + size:
        raise HandshakeError(f"truncated rdma hello: its {name} needs {size} bytes, "
                             f"{len(body) - start} left")
    try:
        return body[start:start + size].decode(), start + size
    except UnicodeDecodeError:
        raise HandshakeError(f"rdma hello {name} is not UTF-8") from None
