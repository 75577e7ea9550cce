"""The ``global`` scheduler's envelopes: queued requests, and outputs or claims sent to an origin.

Requests and outputs inside them use the shared codec of :mod:`fdcore.redis`.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from fdcore.redis import decode_output, decode_request, encode
from fdcore.types import EngineRequest, RequestOutput


@dataclass(frozen=True, slots=True)
class Queued:
    """A request in an instance's Redis queue.

    ``origin`` is the instance whose client waits for it; ``ticket`` is unique to this one
    submission, so outputs can never be credited to another request with the same id (on this
    origin after a retry, or on another origin).
    """

    origin: str
    ticket: str
    queued_at: float  # wall-clock seconds: compared across machines against ``ttl``
    request: EngineRequest
    reply: str = ""  # where outputs go ("": the origin's results list; ``splitwise``: a stream)

    def encode(self) -> bytes:
        """``<prompt_len> <ticket> <json>``: the Lua admission reads the prefix only."""
        body = encode({"origin": self.origin, "queued_at": self.queued_at,
                       "request": self.request, "reply": self.reply})
        return f"{self.request.prompt_len} {self.ticket} ".encode() + body

    @classmethod
    def decode(cls, raw: bytes) -> Queued:
        """Inverse of :meth:`encode`."""
        _, ticket, body = raw.split(b" ", 2)
        data = orjson.loads(body)
        return cls(data["origin"], ticket.decode(), data["queued_at"],
                   decode_request(data["request"]), data.get("reply", ""))


@dataclass(frozen=True, slots=True)
class Claim:
    """An instance took some of this origin's queued requests and is running them."""

    by: str
    tickets: list[str]

    def encode(self) -> bytes:
        """The JSON the ``global`` scheduler's Lua ``take`` writes too."""
        return orjson.dumps({"claim": self.tickets, "by": self.by})


@dataclass(frozen=True, slots=True)
class Result:
    """One output of a request that runs away from its origin."""

    ticket: str
    output: RequestOutput

    def encode(self) -> bytes:
        """JSON message for the origin's results list."""
        return encode({"ticket": self.ticket, "output": self.output})


def decode_message(raw: bytes) -> Claim | Result:
    """A message from an origin's results list: a claim (written by Lua) or a result."""
    data = orjson.loads(raw)
    if "claim" in data:
        return Claim(data["by"], list(data["claim"]))
    return Result(data["ticket"], decode_output(data["output"]))
