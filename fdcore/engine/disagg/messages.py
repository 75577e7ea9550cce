"""The P-D connector's messages (DESIGN 8.2): versioned msgpack frames, never pickle.

Every frame is one msgpack map ``{"v": VERSION, "type": ..., "tid": transfer_id, "rid":
request_id, "epoch": sender's instance epoch, "body": {...}}``. :func:`decode` checks the
version, the type, and every field's presence and type before anything reads it, so a frame
from a newer, older or hostile peer is a :class:`MessageError` with a message, never a crash or
an object of the wrong shape. The epoch lets a receiver drop a restarted peer's stale frames.

| type | from | body |
|---|---|---|
| ``prefill`` | P -> D | prompt token ids, sampling, P's transport protocol, KV fingerprint |
| ``cache_sync`` | D -> P | block ids for what D lacks, tokens D has, its handle, hold time |
| ``reject`` | D -> P | why D cannot take it (``no_room``, ``incompatible_layout``, ...) |
| ``done`` | P -> D | the first token, cached and prompt tokens |
| ``fail`` | either | why the hand-off failed |
| ``abort`` / ``abort_ack`` | either | why, and its acknowledgement |
| ``heartbeat`` | either | transfers still alive (their holds are renewed) |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import msgpack

VERSION = 1
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a 128k-token prompt is under 1 MiB


class MessageError(ValueError):
    """A frame that cannot be read: malformed, another version, a field missing or mistyped."""


@dataclass(frozen=True, slots=True)
class Message:
    """Fields every message carries."""

    TYPE: ClassVar[str] = ""
    transfer_id: str
    request_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Prefill(Message):
    """P has scheduled the request: D should reserve blocks for this prompt."""

    TYPE: ClassVar[str] = "prefill"
    prompt_token_ids: list[int] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    protocol: str = ""  # the transport P will write with (ipc, tcp, rdma)
    fingerprint: str = ""  # P's KVLayout.fingerprint(): D refuses a pool it cannot take


@dataclass(frozen=True, slots=True)
class CacheSync(Message):
    """D has reserved: write the prompt's blocks past ``cached_tokens`` into ``block_ids``."""

    TYPE: ClassVar[str] = "cache_sync"
    block_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    handle: dict[str, Any] = field(default_factory=dict)
    hold_secs: float = 0.0


@dataclass(frozen=True, slots=True)
class Reject(Message):
    """D cannot take the request."""

    TYPE: ClassVar[str] = "reject"
    reason: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class Done(Message):
    """P has written every block: D may treat the prompt as computed."""

    TYPE: ClassVar[str] = "done"
    first_token: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Fail(Message):
    """The hand-off failed on the sender's side."""

    TYPE: ClassVar[str] = "fail"
    reason: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class Abort(Message):
    """Stop this transfer (a router abort, a client gone, a shutdown)."""

    TYPE: ClassVar[str] = "abort"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AbortAck(Message):
    """The abort is done on this side: nothing more will be written or read."""

    TYPE: ClassVar[str] = "abort_ack"


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """The sender is alive and still wants these transfers."""

    TYPE: ClassVar[str] = "heartbeat"
    transfer_ids: list[str] = field(default_factory=list)


TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Prefill, CacheSync, Reject, Done, Fail, Abort, AbortAck, Heartbeat)
}
_COMMON = {"transfer_id": "tid", "request_id": "rid", "epoch": "epoch"}


def encode(message: Message) -> bytes:
    """One frame for ``message``."""
    body = {k: v for k, v in asdict(message).items() if k not in _COMMON}
    return msgpack.packb({"v": VERSION, "type": message.TYPE, "tid": message.transfer_id,
                          "rid": message.request_id, "epoch": message.epoch, "body": body})


def decode(frame: bytes) -> Message:
    """The message in ``frame``; :class:`MessageError` when it is not a valid one."""
    if len(frame) > MAX_FRAME_BYTES:
        raise MessageError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        doc = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for bad input
        raise MessageError(f"not a msgpack frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(doc, dict):
        raise MessageError("a frame must be a map")
    version = doc.get("v")
    if version != VERSION:
        raise MessageError(f"protocol version {version!r}; this engine speaks {VERSION}")
    cls = TYPES.get(doc.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise MessageError(f"unknown message type {doc.get('type')!r}")
    body = doc.get("body")
    if not isinstance(body, dict):
        raise MessageError(f"{cls.TYPE}: body must be a map")
    values: dict[str, Any] = {}
    for name, key in _COMMON.items():
        values[name] = _check(cls.TYPE, name, doc.get(key), str if name != "epoch" else int)
    for spec in fields(cls):
        if spec.name in _COMMON:
            continue
        if spec.name not in body:
            raise MessageError(f"{cls.TYPE}: missing field {spec.name!r}")
        values[spec.name] = _CHECKS[spec.type](cls.TYPE, spec.name, body[spec.name])  # type: ignore[index]
    return cls(**values)


def _check(kind: str, name: str, value: Any, expected: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, expected):
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        raise MessageError(f"{kind}: field {name!r} must be {expected.__name__}, got "
                           f"{type(value).__name__}")
    return value


def _list_of(item: type) -> Callable[[str, str, Any], list[Any]]:
    def check(kind: str, name: str, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise MessageError(f"{kind}: field {name!r} must be a list")
        for element in value:
            _check(kind, f"{name}[]", element, item)
        return value

    return check


def _map(kind: str, name: str, value: Any) -> Mapping[str, Any]:
    return _check(kind, name, value, dict)


_CHECKS: dict[str, Callable[[str, str, Any], Any]] = {
    "str": lambda kind, name, value: _check(kind, name, value, str),
    "int": lambda kind, name, value: _check(kind, name, value, int),
    "float": lambda kind, name, value: _check(kind, name, value, float),
    "list[int]": _list_of(int),
    "list[str]": _list_of(str),
    "dict[str, Any]": _map,
}
