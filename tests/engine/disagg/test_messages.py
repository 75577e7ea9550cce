"""The connector's frames: every message round-trips; anything else is a MessageError."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdcore.engine.disagg.messages import (
    TYPES,
    VERSION,
    Abort,
    AbortAck,
    CacheSync,
    Done,
    Fail,
    Heartbeat,
    MessageError,
    Prefill,
    Reject,
    decode,
    encode,
)

ids = st.text(min_size=1, max_size=40)
epochs = st.integers(0, 2**62)
MESSAGES = st.one_of(
    st.builds(Prefill, ids, ids, epochs, st.lists(st.integers(0, 2**31), max_size=200),
              st.dictionaries(st.sampled_from(["max_tokens", "temperature", "stop"]),
                              st.one_of(st.integers(0, 99), st.floats(0, 2), st.text())),
              st.sampled_from(["ipc", "tcp", "rdma"]), st.text(max_size=16)),
    st.builds(CacheSync, ids, ids, epochs, st.lists(st.integers(0, 10**6), max_size=64),
              st.integers(0, 10**6), st.fixed_dictionaries({"shm": st.text()}),
              st.floats(0, 600)),
    st.builds(Reject, ids, ids, epochs, st.sampled_from(["no_room", "incompatible_layout"]),
              st.text()),
    st.builds(Done, ids, ids, epochs, st.integers(0, 2**31), st.integers(0, 10**6),
              st.integers(0, 10**6)),
    st.builds(Fail, ids, ids, epochs, st.text(), st.text()),
    st.builds(Abort, ids, ids, epochs, st.text()),
    st.builds(AbortAck, ids, ids, epochs),
    st.builds(Heartbeat, st.just(""), st.just(""), epochs, st.lists(ids, max_size=20)),
)


@given(MESSAGES)
def test_every_message_round_trips(message: object) -> None:
    assert decode(encode(message)) == message  # type: ignore[arg-type]


def test_every_type_is_covered() -> None:
    assert set(TYPES) == {"prefill", "cache_sync", "reject", "done", "fail", "abort",
                          "abort_ack", "heartbeat"}


def frame(**changes: object) -> bytes:
    doc = msgpack.unpackb(encode(Done("t", "r", 1, 7, 0, 5)))
    for key, value in changes.items():
        if key.startswith("body_"):
            doc["body"][key[5:]] = value
        else:
            doc[key] = value
    return msgpack.packb(doc)


@pytest.mark.parametrize(("data", "message"), [
    (b"\xc1", "not a msgpack frame"),
    (encode(Done("t", "r", 1, 7, 0, 5))[:-3], "not a msgpack frame"),
    (msgpack.packb([1, 2]), "a frame must be a map"),
    (frame(v=VERSION + 1), f"protocol version {VERSION + 1}"),
    (frame(v=None), "protocol version None"),
    (frame(type="launch_missiles"), "unknown message type 'launch_missiles'"),
    (frame(body=[]), "done: body must be a map"),
    (frame(tid=5), "field 'transfer_id' must be str"),
    (frame(epoch="1"), "field 'epoch' must be int"),
    (frame(body_first_token="7"), "field 'first_token' must be int"),
    (frame(body_first_token=True), "field 'first_token' must be int"),
    (msgpack.packb({"v": VERSION, "type": "done", "tid": "t", "rid": "r", "epoch": 1,
                    "body": {"first_token": 1, "cached_tokens": 0}}),
     "missing field 'prompt_tokens'"),
    (msgpack.packb({"v": VERSION, "type": "prefill", "tid": "t", "rid": "r", "epoch": 1,
                    "body": {"prompt_token_ids": [1, "2"], "sampling": {}, "protocol": "ipc",
                             "fingerprint": ""}}),
     "field 'prompt_token_ids[]' must be int"),
])
def test_bad_frames_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(MessageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode(data)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_escape_as_another_error(data: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode(data)


def test_no_pickle_even_in_an_extension_type() -> None:
    evil = msgpack.packb(msgpack.ExtType(1, b"cos\nsystem\n(S'true'\ntR."))
    with pytest.raises(MessageError, match="a frame must be a map"):
        decode(evil)
