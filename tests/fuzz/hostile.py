"""Hostile HTTP that schemathesis does not generate: hypothesis strategies and
:class:`HostileHTTP`, the tests both servers' fuzz modules run (each subclasses it and defines
a ``target`` fixture naming its port and endpoints)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.raw_http import Answer, assert_answered_well, exchange, head

# Each example is one loopback request: a few dozen per test keeps the folder well under a
# minute on two cores while still reaching every branch the strategies below describe.
# The router's and the engine's test classes share these methods (differing executors), which
# is safe here: derandomized runs keep no example database to replay across them.
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.differing_executors])

CONTROL = st.sampled_from([b"\r", b"\n", b"\x00", b"\x01", b"\x1b", b"\x7f", b"\t", b" "])
HOSTILE_BYTES = st.lists(
    st.one_of(CONTROL, st.binary(min_size=1, max_size=4),
              st.text(min_size=1, max_size=3).map(lambda t: t.encode("utf-8")),
              st.sampled_from([b"\xff\xfe", b"caf\xc3\xa9", b"%00", b"%0d%0a", b"/../", b"?", b"#"])),
    min_size=1, max_size=12,
).map(b"".join)
OVERLONG = st.integers(min_value=300, max_value=20_000).map(lambda n: b"x" * n)
HEADER_VALUE = st.one_of(HOSTILE_BYTES, OVERLONG)
# x-test-* steers the router's test backend and x-fdcore-via is the router's loop guard: a
# fuzzed name must not be either.
HEADER_NAME = st.one_of(HOSTILE_BYTES, st.from_regex(rb"\A[!-~]{1,40}\Z")).filter(
    lambda n: not n.lower().startswith((b"x-test", b"x-fdcore-via"))
)
# A request id must be 1..256 visible ASCII characters (fdcore/http.py); HTTP servers strip
# the spaces and tabs around a header value.
BAD_HEADER_REQUEST_ID = HEADER_VALUE.filter(
    lambda v: re.fullmatch(rb"[!-~]{1,256}", v.strip(b" \t")) is None
)
BAD_REQUEST_ID = st.one_of(
    st.text(min_size=1, max_size=20).filter(lambda t: not all("!" <= c <= "~" for c in t)),
    st.just(""), st.just("x" * 257),
)
JSON_SCALAR = st.one_of(
    st.none(), st.booleans(), st.text(max_size=10),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, -(2**63), 0, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
)
JSON_VALUE = st.recursive(
    JSON_SCALAR, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12,
)
HUGE_NUMBERS = [b"1e400", b"-1e400", b"1" + b"0" * 400, b"18446744073709551616",
                b"-9223372036854775809", b"1e-400", b"0.1e999999"]
# Well-formed but wrong (hostile header bytes are test_header's).
CONTENT_TYPES = st.sampled_from([b"text/plain", b"application/x-www-form-urlencoded",
                                 b"multipart/form-data; boundary=x", b"application/json; charset=latin-1",
                                 b"", b"application/xml", b"*/*"])


# Each is refused by the HTTP parser as soon as it is read (none leaves it waiting for more).
BAD_FRAMING = [b"zz\r\n{}\r\n0\r\n\r\n", b"-1\r\n\r\n", b"2\r\n{}0\r\n\r\n",
               b"2;\x00\r\n{}\r\n0\r\n\r\n", b"0\r\nx: \x01\r\n\r\n", b"\xff\r\n\r\n"]
_VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1.1\x00", b""]
_ANY_BODY = st.one_of(st.binary(max_size=200), st.sampled_from(HUGE_NUMBERS),
                      JSON_VALUE.map(orjson.dumps))
_ANY_FIELD_VALUE = st.one_of(JSON_VALUE, st.sampled_from([orjson.Fragment(n) for n in HUGE_NUMBERS]))


@dataclass
class Target:
    """A server under test: its port, a valid body per POST path, and each body's fields."""

    port: int
    bodies: dict[str, dict[str, Any]]
    fields: dict[str, list[str]]
    inference: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions")

    def post(self, path: str, body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
             content_type: bytes = b"application/json") -> Answer:
        """POST ``body`` on a fresh connection and read the answer."""
        return exchange(self.port, head(b"POST", path.encode(),
                                        [(b"content-type", content_type), *(headers or [])], body))

    def send(self, raw: bytes) -> Answer:
        """Send raw bytes on a fresh connection and read the answer."""
        return exchange(self.port, raw)


def _paths(data: st.DataObject, target: Target, inference: bool = False) -> str:
    return data.draw(st.sampled_from(sorted(target.inference if inference else target.bodies)))


class HostileHTTP:
    """Every request gets an answer under 500, 4xx with a JSON error body wherever the app (not
    the HTTP server's own parser) answers. Subclass as ``Test...`` beside a ``target`` fixture."""

    @given(data=st.data(), method=st.one_of(st.sampled_from([b"GET", b"POST", b"X" * 300]),
                                            HOSTILE_BYTES),
           version=st.sampled_from(_VERSIONS))
    @FUZZ
    def test_request_line(self, target: Target, data: st.DataObject, method: bytes,
                          version: bytes) -> None:
        path = data.draw(st.one_of(st.sampled_from([p.encode() for p in target.bodies]),
                                   HOSTILE_BYTES.map(lambda b: b"/" + b), OVERLONG))
        raw = method + b" " + path + b" " + version + b"\r\nhost: fuzz\r\nconnection: close\r\n\r\n"
        assert_answered_well(target.send(raw), json_error=False)

    @given(data=st.data(), name=HEADER_NAME, value=HEADER_VALUE)
    @FUZZ
    def test_header(self, target: Target, data: st.DataObject, name: bytes, value: bytes) -> None:
        path = _paths(data, target)
        answer = target.post(path, orjson.dumps(target.bodies[path]), [(name, value)])
        assert_answered_well(answer, json_error=False)

    @given(data=st.data(), value=BAD_HEADER_REQUEST_ID)
    @FUZZ
    def test_header_request_id(self, target: Target, data: st.DataObject, value: bytes) -> None:
        path = _paths(data, target, inference=True)
        answer = target.post(path, orjson.dumps(target.bodies[path]), [(b"x-request-id", value)])
        assert_answered_well(answer, json_error=False)
        if answer.headers.get(b"content-type") == b"application/json":  # the app saw it
            assert answer.status == 400, answer.body[:300]
            if b"\r" not in value and b"\n" not in value:  # else it may end the header early
                assert answer.json()["error"]["param"] == "x-request-id", answer.body[:300]

    @given(data=st.data(), value=BAD_REQUEST_ID)
    @FUZZ
    def test_body_request_id(self, target: Target, data: st.DataObject, value: str) -> None:
        path = _paths(data, target, inference=True)
        answer = target.post(path, orjson.dumps({**target.bodies[path], "request_id": value}))
        assert_answered_well(answer, json_error=True)
        assert answer.status == 400, answer.body[:300]
        assert answer.json()["error"]["param"] == "request_id"

    @given(data=st.data(), body=_ANY_BODY,
           content_type=st.one_of(st.just(b"application/json"), CONTENT_TYPES))
    @FUZZ
    def test_raw_body(self, target: Target, data: st.DataObject, body: bytes,
                      content_type: bytes) -> None:
        answer = target.post(_paths(data, target), body, content_type=content_type)
        assert_answered_well(answer, json_error=True)

    @given(data=st.data(), value=_ANY_FIELD_VALUE)
    @FUZZ
    def test_wrong_field_type(self, target: Target, data: st.DataObject, value: Any) -> None:
        path = _paths(data, target)
        field = data.draw(st.sampled_from(target.fields[path]))
        answer = target.post(path, orjson.dumps({**target.bodies[path], field: value}))
        assert_answered_well(answer, json_error=True)

    @pytest.mark.parametrize("depth", [100, 2000])
    @pytest.mark.parametrize("brackets", [(b"[", b"]"), (b'{"a":', b"}")])
    def test_deep_nesting(self, target: Target, depth: int, brackets: tuple[bytes, bytes]) -> None:
        for path, body in target.bodies.items():
            value = brackets[0] * depth + b"1" + brackets[1] * depth
            field = target.fields[path][0].encode()
            raw = orjson.dumps(body)[:-1] + b',"' + field + b'":' + value + b"}"
            assert_answered_well(target.post(path, raw), json_error=True)

    def test_duplicate_keys(self, target: Target) -> None:
        for path, body in target.bodies.items():
            raw = orjson.dumps(body)
            raw = raw[:-1] + b"," + raw[1:-1] + b',"stream":1,"stream":false}'
            assert_answered_well(target.post(path, raw), json_error=True)

    @given(data=st.data(), cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6))
    @FUZZ
    def test_chunked_body(self, target: Target, data: st.DataObject, cuts: list[int]) -> None:
        path = _paths(data, target)
        body = orjson.dumps(target.bodies[path])
        pieces, last = [], 0
        for cut in [*sorted(c % (len(body) + 1) for c in cuts), len(body)]:
            if cut > last:
                pieces.append(body[last:cut])
                last = cut
        encoded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        assert_answered_well(target.send(_chunked_head(path) + encoded), json_error=True)

    @pytest.mark.parametrize("framing", BAD_FRAMING)
    def test_bad_chunking(self, target: Target, framing: bytes) -> None:
        for path in target.inference:
            assert_answered_well(target.send(_chunked_head(path) + framing), json_error=False)


def _chunked_head(path: str) -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\n"
            b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
