"""The paired dispatch (splitwise mode): a prefill and a decode instance serve one request.

Per attempt (DESIGN 8.1): the selector takes a prefill lease, then a decode lease among the
decode instances that can pair with it (:mod:`fdcore.router.pairing`); the router sends the
request to both at once with ``disaggregate_info`` (a fresh ``transfer_id`` each attempt). The
decode instance's answer is the client's; the prefill's is read and dropped, and its lease ends
when it arrives (P answers once its prefill is handed off: it is sent ``stream: false``).

Retries (FastDeploy's ``preempt-retry-count``): a decode answer with ``PD Error`` in its error
message or ``pd_reschedule`` as its finish reason, a prefill instance that cannot be reached or
fails, or a decode instance that cannot be reached, is retried on a new pair, as
``{request_id}-retry{n}``, as long as the client has seen nothing. A stream is held back until
its first token (or its end), so a hand-off that fails before the first token is retried even
when streaming.

Conditional disaggregation (DESIGN 8.5): a prompt estimated below
``scheduler.pd-min-prompt-tokens``, or a request arriving while every prefill instance has
``scheduler.pd-max-prefill-queue`` requests in flight, is sent to a decode instance alone,
without ``disaggregate_info`` (it prefills there). Each decision is counted in
``fdcore_router_pd_decisions_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid

import orjson
import structlog
from starlette.types import Send

from fdcore.config import RouterConfig
from fdcore.router.pairing import choose_protocol, disaggregate_info, pair_problem
from fdcore.router.proxy import Exchange, Proxy
from fdcore.router.selection import Lease, NoInstance
from fdcore.router.upstream import ConnectFailed, ResponseFailed
from fdcore.types import PD_ERROR, PD_RESCHEDULE, Outcome, Role

log = structlog.get_logger("fdcore.proxy")

_PD_ERROR = PD_ERROR.encode()
_PD_RESCHEDULE = b'"' + PD_RESCHEDULE.encode() + b'"'
_INFO_KEY = "disaggregate_info"


class Reschedule(Exception):
    """This attempt failed before the client saw a byte; try a new pair.

    ``side`` failed (``prefill`` or ``decode``), at ``url``; ``blame``: that instance is left
    out of the next pairs (it could not be reached or failed on its own).
    """

    def __init__(self, message: str, side: str, url: str, blame: bool = False) -> None:
        super().__init__(message)
        self.side = side
        self.url = url
        self.blame = blame


def _error_message(data: bytes) -> str:
    """The ``error.message`` of an answer or SSE event, else its first bytes."""
    text = data.removeprefix(b"data: ").strip()
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        message = orjson.loads(text)["error"]["message"]
        if isinstance(message, str):
            return message
    return text[:300].decode(errors="replace")


def _role_only(event: bytes) -> bool:
    """Whether an SSE event is a chat stream's opening chunk (the role, no content yet)."""
    try:
        data = orjson.loads(event.removeprefix(b"data: "))
        (choice,) = data["choices"]
        delta = choice["delta"]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return False
    return (isinstance(delta, dict) and choice.get("finish_reason") is None
            and not delta.get("content") and set(delta) <= {"role", "content"})


class PDScreen:
    """Refuses a decode answer that reports a failed hand-off (:class:`Reschedule`), and
    holds a stream back until its first token, which comes only once the hand-off is done."""

    def __init__(self, decode_url: str) -> None:
        self.decode_url = decode_url

    def _refuse(self, data: bytes) -> None:
        raise Reschedule(f"decode {self.decode_url}: {_error_message(data)}", "decode",
                         self.decode_url)

    def answer(self, status: int, body: bytes) -> None:
        """Refuse ``PD Error`` answers and ``pd_reschedule`` finishes."""
        if (status >= 400 and _PD_ERROR in body) or (status == 200 and _PD_RESCHEDULE in body):
            self._refuse(body)

    def ready(self, head: bytes) -> bool:
        """True once a complete event other than the role chunk has arrived."""
        *events, _ = head.split(b"\n\n")
        for event in events:
            if _PD_ERROR in event or _PD_RESCHEDULE in event:
                self._refuse(event)
            if event.strip() and not _role_only(event):
                return True
        return False


class PairedDispatch:
    """The splitwise mode's :class:`fdcore.router.proxy.Dispatch`."""

    def __init__(self, proxy: Proxy, config: RouterConfig) -> None:
        self.proxy = proxy
        self.selector = proxy.selector
        self.metrics = proxy.metrics
        self.retries = config.proxy.preempt_retry_count
        self.exclude_decode = config.proxy.preempt_retry_exclude_decode
        self.total_timeout = config.proxy.total_timeout_secs
        scheduler = config.scheduler
        self.min_tokens = scheduler.pd_min_prompt_tokens
        self.max_queue = scheduler.pd_max_prefill_queue
        self.chars_per_token = scheduler.pd_chars_per_token

    async def __call__(self, ex: Exchange, send: Send) -> None:
        """Serve ``ex`` by a pair (or a decode instance alone), retrying failed hand-offs."""
        exclude: set[str] = set()
        failures: list[str] = []
        for attempt in range(self.retries + 1):
            upstream_id = ex.request_id if not attempt else f"{ex.request_id}-retry{attempt}"
            reason = self.decode_alone(ex)
            try:
                if reason:
                    await self._alone(ex, send, reason, frozenset(exclude), upstream_id)
                else:
                    await self._paired(ex, send, frozenset(exclude), upstream_id)
                return
            except NoInstance as exc:
                message = str(exc)
                if failures:
                    message += f" (after {len(failures)} failed attempts; last: {failures[-1]})"
                await self.proxy.reply_error(ex, send, exc.status, message, exc.type,
                                             retry_after=exc.retry_after)
                return
            except Reschedule as exc:
                failures.append(str(exc))
                if exc.blame or (exc.side == "decode" and self.exclude_decode):
                    exclude.add(exc.url)
                self.metrics.child(self.metrics.pd_reschedules, exc.side).inc()
                log.warning("pd attempt failed", request_id=ex.request_id, attempt=attempt + 1,
                            side=exc.side, error=str(exc), retries_left=self.retries - attempt)
        await self.proxy.reply_error(
            ex, send, 503, f"the prefill/decode hand-off failed {len(failures)} times "
            f"(proxy.preempt-retry-count: {self.retries}); last: {failures[-1]}",
            "service_unavailable", code="pd_error")

    def decode_alone(self, ex: Exchange) -> str:
        """Why this request is served by one instance, without a hand-off ("" when it is
        disaggregated)."""
        reason = ""
        if self.min_tokens and ex.route.token_estimate / self.chars_per_token < self.min_tokens:
            reason = "short_prompt"
        elif self.max_queue:
            prefills = self.selector.instances.healthy(Role.PREFILL)
            if prefills and all(p.load.requests >= self.max_queue for p in prefills):
                reason = "prefill_queue_deep"
        decision = "alone" if reason else "disaggregated"
        self.metrics.child(self.metrics.pd_decisions, decision, reason).inc()
        if reason:
            log.info("pd alone", request_id=ex.request_id, reason=reason)
        return reason

    def _body(self, ex: Exchange, upstream_id: str, info: dict[str, object] | None,
              stream: bool | None = None) -> bytes:
        payload = {k: v for k, v in ex.payload.items() if k != _INFO_KEY}
        if info is None and upstream_id == ex.request_id and len(payload) == len(ex.payload):
            return ex.body  # as the client sent it
        payload["request_id"] = upstream_id
        if info is not None:
            payload[_INFO_KEY] = info
        if stream is not None:
            payload["stream"] = stream
            if not stream:
                payload.pop("stream_options", None)
        return orjson.dumps(payload)

    async def _alone(self, ex: Exchange, send: Send, reason: str, exclude: frozenset[str],
                     upstream_id: str) -> None:
        # A short prompt may run on a prefill instance as well (it serves a request without
        # disaggregate_info itself): the short-prompt load then spreads over every instance.
        # With every prefill queue deep, only decode instances are candidates.
        route = dataclasses.replace(ex.route, role=Role.DECODE)
        also = Role.PREFILL if reason == "short_prompt" else None
        lease = await self.selector.acquire(route, exclude, upstream_id=upstream_id, also=also)
        url = lease.instance.url
        await self._decode(ex, send, lease, self._body(ex, upstream_id, None), upstream_id,
                           ("", "", url), ((b"x-router-decode-url", url.encode()),))

    async def _paired(self, ex: Exchange, send: Send, exclude: frozenset[str],
                      upstream_id: str) -> None:
        p_route = dataclasses.replace(ex.route, role=Role.PREFILL)
        d_route = dataclasses.replace(ex.route, role=Role.DECODE)
        p, d = await self.selector.acquire_pair(p_route, d_route, exclude, pair_problem,
                                                upstream_id)
        protocol = choose_protocol(p.instance, d.instance)
        assert protocol is not None  # pair_problem admitted only pairs that have one
        info = disaggregate_info(p.instance, d.instance, protocol, uuid.uuid4().hex)
        p_url, d_url = p.instance.url, d.instance.url
        prefill = asyncio.ensure_future(self._prefill(p, self._body(ex, upstream_id, info, False),
                                                      upstream_id, ex))
        try:
            await self._decode(ex, send, d, self._body(ex, upstream_id, info), upstream_id,
                               ("", p_url, d_url),
                               ((b"x-router-prefill-url", p_url.encode()),
                                (b"x-router-decode-url", d_url.encode())), (prefill, p_url))
        finally:
            if not prefill.done():
                prefill.cancel()  # closing P's connection aborts its side of the hand-off
            with contextlib.suppress(asyncio.CancelledError):
                await prefill

    async def _prefill(
        self, lease: Lease, body: bytes, upstream_id: str, ex: Exchange
    ) -> tuple[str, bool]:
        """Send the prefill half; read and drop its answer; release its lease. Returns why it
        failed in a way that dooms the hand-off ("" when it did not) and whether the prefill
        instance is to blame (not when it only reports that the hand-off failed)."""
        instance = lease.instance
        outcome, status, first_byte_at, answer = Outcome.ERROR, 0, None, b""
        try:
            async with asyncio.timeout(self.total_timeout):
                upstream = await self.proxy.pool.request(
                    instance.host_ip, instance.port, self.proxy.head(ex, upstream_id), body,
                    upstream_id.encode("ascii"))
                # Its answer comes once its part is done: the prefill lease ends with it.
                status, first_byte_at = upstream.status, time.perf_counter()
                try:
                    answer = await upstream.read()
                except BaseException:
                    upstream.close()
                    raise
                upstream.release()
            if status >= 500:
                # Not P's fault when D refused the hand-off (P says so with PD Error).
                handoff = _PD_ERROR in answer
                outcome = Outcome.DISCONNECT if handoff else Outcome.ERROR
                return (f"prefill {instance.url} answered {status}: {_error_message(answer)}",
                        not handoff)
            outcome = Outcome.SUCCESS
            return "", False
        except ConnectFailed as exc:
            return f"prefill {instance.url}: {exc}", True
        except (ResponseFailed, TimeoutError) as exc:
            return f"prefill {instance.url} failed: {exc!r}", True
        except asyncio.CancelledError:
            outcome = Outcome.DISCONNECT
            raise
        finally:
            lease.release(outcome, status, False, first_byte_at, answer)

    async def _decode(
        self, ex: Exchange, send: Send, lease: Lease, body: bytes, upstream_id: str,
        labels: tuple[str, str, str], headers: tuple[tuple[bytes, bytes], ...],
        prefill: tuple[asyncio.Future[tuple[str, bool]], str] | None = None,
    ) -> None:
        """Relay the decode instance's answer; raise :class:`Reschedule` when the attempt
        failed before the client saw a byte and a new pair may do better."""
        url = lease.instance.url
        ex.first_byte_at, ex.upstream_status, ex.answer = None, 0, b""
        outcome = Outcome.ERROR
        screen = PDScreen(url) if prefill is not None else None
        decode = asyncio.ensure_future(self.proxy.exchange(
            ex, lease, self.proxy.head(ex, upstream_id), body, send, labels=labels,
            headers=headers, screen=screen, upstream_id=upstream_id))
        try:
            if prefill is not None:
                half, p_url = prefill
                await asyncio.wait((decode, half), return_when=asyncio.FIRST_COMPLETED)
                failed, blame = half.result() if half.done() else ("", False)
                if failed and not decode.done() and not ex.status:
                    # D waits for a P that failed (not D's fault): a new pair.
                    raise Reschedule(failed, "prefill", p_url, blame)
            outcome = await decode
        except Reschedule:
            outcome = Outcome.DISCONNECT
            raise
        except ConnectFailed as exc:
            raise Reschedule(f"decode {url}: {exc}", "decode", url) from None
        except (TimeoutError, ResponseFailed) as exc:
            outcome = await self.proxy.answer_failure(ex, send, exc, url)
        except asyncio.CancelledError:
            outcome = Outcome.DISCONNECT if ex.gone or ex.drained else Outcome.ERROR
            raise
        finally:
            if not decode.done():
                decode.cancel()  # closing D's connection aborts its side of the hand-off
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await decode
            lease.release(outcome, ex.upstream_status, ex.stream and ex.upstream_status == 200,
                          ex.first_byte_at, ex.answer)
