"""An origin's book of its own requests: where each one is and what its client has seen."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace

from fdcore.types import EngineRequest, RequestOutput

from .wire import Claim, Queued


@dataclass(slots=True)
class Own:
    """One request whose client waits on this instance."""

    queued: Queued
    heard_at: float  # monotonic: when it was queued or last showed progress
    executor: str = ""  # "" while queued in Redis; then the instance that runs it
    tokens: int = 0  # completion tokens delivered so far: a jump means outputs were lost

    @property
    def request_id(self) -> str:
        """The id the client knows."""
        return self.queued.request.request_id


def failure(request: EngineRequest, message: str, code: int = 503) -> RequestOutput:
    """A final error output for ``request``."""
    return RequestOutput(
        request_id=request.request_id, token_ids=[], finished=True, finish_reason="error",
        prompt_tokens=request.prompt_len, error=message, error_code=code,
    )


class Ledger:
    """Own requests by id and by ticket; finished, failed or aborted ones leave it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._by_id: dict[str, Own] = {}
        self._by_ticket: dict[str, Own] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, request: EngineRequest) -> Queued:
        """Book a new submission and return it as it will be queued."""
        queued = Queued(self.name, uuid.uuid4().hex, time.time(), request)
        own = Own(queued, time.monotonic())
        self._by_id[request.request_id] = self._by_ticket[queued.ticket] = own
        return queued

    def forget(self, request_id: str) -> Own | None:
        """Drop a request: any output that still arrives for it is ignored."""
        own = self._by_id.pop(request_id, None)
        if own is not None:
            del self._by_ticket[own.queued.ticket]
        return own

    def take(self, ticket: str) -> Own | None:
        """This instance's engine took the request; None if it was forgotten meanwhile."""
        own = self._by_ticket.get(ticket)
        if own is not None:
            own.executor, own.heard_at = self.name, time.monotonic()
        return own

    def claim(self, claim: Claim) -> None:
        """Another instance took these requests."""
        for ticket in claim.tickets:
            own = self._by_ticket.get(ticket)
            if own is not None:
                own.executor, own.heard_at = claim.by, time.monotonic()

    def accept(self, output: RequestOutput, ticket: str | None = None) -> RequestOutput | None:
        """Credit an output to its request (by ticket when it ran elsewhere).

        Returns what the client should see: the output under the client's id, a failure when
        earlier outputs went missing, or None when the request is no longer booked or the
        output repeats tokens already credited.
        """
        own = self._by_ticket.get(ticket) if ticket else self._by_id.get(output.request_id)
        if own is None:
            return None
        request = own.queued.request
        own.heard_at = time.monotonic()
        if (output.error is None and output.token_ids
                and output.completion_tokens <= own.tokens):
            return None  # a repeat (a write retried after its reply was lost): seen already
        if output.error is None and output.completion_tokens != own.tokens + len(output.token_ids):
            output = failure(
                request, f"request {request.request_id}: outputs sent by {own.executor} were "
                "lost in Redis; its answer is incomplete",
            )
        else:
            output = replace(output, request_id=request.request_id)
            own.tokens = output.completion_tokens
        if output.finished:
            self.forget(request.request_id)
        return output

    def queued_count(self) -> int:
        """Own requests still waiting in Redis as far as this instance knows."""
        return sum(1 for own in self._by_id.values() if not own.executor)

    def away(self) -> list[Own]:
        """Own requests that are not running here (queued in Redis or running elsewhere)."""
        return [own for own in self._by_id.values() if own.executor != self.name]
