"""The API side of the scheduler: one output stream per request, fed by a dispatcher task."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable

from fdcore.engine.engine_loop import EngineLoop
from fdcore.engine.metrics import EngineMetrics
from fdcore.http import INVALID_REQUEST, APIError
from fdcore.types import EngineRequest, Rejection, RejectionKind, RequestOutput, Scheduler

# How long the dispatcher waits for outputs before checking again (it is woken by outputs).
_RESULT_WAIT_SECONDS = 1.0


class RequestStream:
    """The outputs of one request, in order, ending with a finished one."""

    def __init__(self, request: EngineRequest) -> None:
        self.request = request
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.completion_tokens = 0
        self.first_token_at: float | None = None

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            output = await self.queue.get()
            yield output
            if output.finished:
                return


# How the API answers a request its scheduler refused: HTTP status, OpenAI error type and
# param. The error's ``code`` is the kind itself.
_REFUSALS: dict[RejectionKind, tuple[int, str, str | None]] = {
    RejectionKind.QUEUE_FULL: (429, "rate_limit_error", None),
    RejectionKind.DUPLICATE_ID: (409, INVALID_REQUEST, "request_id"),
    RejectionKind.UNAVAILABLE: (503, "service_unavailable_error", None),
    RejectionKind.INVALID: (400, INVALID_REQUEST, None),
}


def _refused(rejection: Rejection) -> APIError:
    status, type_, param = _REFUSALS[rejection.kind]
    return APIError(status, rejection.message, type_, param, str(rejection.kind))


class Serving:
    """Submits requests to the scheduler and routes their outputs to per-request streams."""

    def __init__(
        self, scheduler: Scheduler, engine: EngineLoop, metrics: EngineMetrics,
        take_over: Callable[[EngineRequest], bool] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.engine = engine
        self.metrics = metrics
        # On a decode engine: takes a P-D hand-off's request instead of the scheduler.
        self.take_over = take_over
        self._streams: dict[str, RequestStream] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start routing outputs."""
        self._dispatcher = asyncio.create_task(self._dispatch(), name="fdcore-dispatch")

    async def stop(self) -> None:
        """Stop routing outputs."""
        for task in (self._dispatcher, *self._background):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def submit(self, request: EngineRequest) -> RequestStream:
        """Queue ``request``; raises :class:`APIError` when the scheduler refuses it."""
        rid = request.request_id
        if rid in self._streams:
            duplicate = f"duplicated request_id: {rid}"
            raise _refused(Rejection(rid, RejectionKind.DUPLICATE_ID, duplicate))
        stream = self._streams[rid] = RequestStream(request)
        if self.take_over is not None and self.take_over(request):
            self.metrics.requests_number.inc()
            return stream
        try:
            rejected = await self.scheduler.put_requests([request])
        except BaseException:
            del self._streams[rid]  # or the id would stay "in flight" for good
            raise
        if rejected:
            del self._streams[rid]
            raise _refused(rejected[0])
        self.metrics.requests_number.inc()
        return stream

    async def abort(self, request_ids: Iterable[str]) -> tuple[list[dict[str, object]], list[str]]:
        """Abort requests of this instance; returns ``(aborted, not_found)``.

        Returns once their sequences are out of the batch and their blocks are free.
        """
        ids = list(dict.fromkeys(request_ids))
        found = [self._streams[rid] for rid in ids if rid in self._streams]
        await self.scheduler.abort(ids)
        await self.engine.abort(ids)
        for stream in found:
            self._close(stream)
        aborted = [
            {"request_id": s.request.request_id, "completion_tokens": s.completion_tokens}
            for s in found
        ]
        return aborted, [rid for rid in ids if rid not in {s.request.request_id for s in found}]

    def active_ids(self) -> list[str]:
        """Ids of every request with an open stream."""
        return list(self._streams)

    def cancel(self, request_id: str) -> None:
        """Abort in the background (the client went away; nobody awaits the result)."""
        if request_id in self._streams:
            task = asyncio.get_running_loop().create_task(self._abort_quietly(request_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _abort_quietly(self, request_id: str) -> None:
        await self.abort([request_id])

    def _close(self, stream: RequestStream) -> None:
        self._streams.pop(stream.request.request_id, None)
        stream.queue.put_nowait(
            RequestOutput(
                request_id=stream.request.request_id,
                token_ids=[],
                finished=True,
                finish_reason="abort",
                prompt_tokens=stream.request.prompt_len,
                completion_tokens=stream.completion_tokens,
            )
        )

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their streams directly (requests that bypass the scheduler)."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                self._deliver(stream, output)

    async def _dispatch(self) -> None:
        while True:
            results = await self.scheduler.get_results(timeout=_RESULT_WAIT_SECONDS)
            for rid, outputs in results.items():
                stream = self._streams.get(rid)
                if stream is None:
                    continue  # aborted meanwhile
                for output in outputs:
                    self._deliver(stream, output)

    def _deliver(self, stream: RequestStream, output: RequestOutput) -> None:
        now = time.time()
        if output.token_ids and stream.first_token_at is None:
            stream.first_token_at = now
            self.metrics.time_to_first_token.observe(now - stream.request.arrival_time)
        stream.completion_tokens = max(stream.completion_tokens, output.completion_tokens)
        if output.finished:
            self._streams.pop(output.request_id, None)
            self._observe_finished(stream, output, now)
        stream.queue.put_nowait(output)

    def _observe_finished(self, stream: RequestStream, output: RequestOutput, now: float) -> None:
        m = self.metrics
        m.e2e_request_latency.observe(now - stream.request.arrival_time)
        m.request_prompt_tokens.observe(output.prompt_tokens)
        m.request_generation_tokens.observe(output.completion_tokens)
        if stream.first_token_at is not None and output.completion_tokens > 1:
            tpot = (now - stream.first_token_at) / (output.completion_tokens - 1)
            m.time_per_output_token.observe(tpot)
        if output.error is None:
            m.request_success.inc()
