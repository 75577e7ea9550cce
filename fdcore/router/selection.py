"""Choosing instances through the selection policies, with counters that are always released.

Before a policy sees the candidates, ejected instances (:mod:`fdcore.router.outliers`) and
instances at ``proxy.max-inflight-per-instance`` are taken out; when only full ones remain the
request is refused with :class:`Saturated` rather than queued without bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import structlog

from fdcore.config import RouterConfig
from fdcore.router.instances import InstanceRegistry
from fdcore.router.metrics import RouterMetrics
from fdcore.router.outliers import OutlierDetector
from fdcore.types import Instance, Outcome, RequestResult, Role, RouteRequest, SelectionPolicy

log = structlog.get_logger("fdcore.selection")


class Lease:
    """One request's claim on an instance: counted in on creation, counted out exactly once.

    ``started`` is when the instance was chosen: the origin of the result's ``ttfb`` and
    ``total``.
    """

    __slots__ = ("instance", "policy", "released", "request", "selector", "started",
                 "upstream_id")

    def __init__(
        self, selector: Selector, request: RouteRequest, instance: Instance,
        policy: SelectionPolicy, upstream_id: str = "",
    ) -> None:
        self.selector = selector
        self.request = request
        self.instance = instance
        self.policy = policy
        # The id the instance knows the request by (a prefill/decode retry sends a new one).
        self.upstream_id = upstream_id or request.request_id
        self.released = False
        self.started = time.perf_counter()
        load = instance.load
        load.requests += 1
        load.tokens += request.token_estimate

    def release(
        self, outcome: Outcome, status: int = 0, streamed: bool = False,
        first_byte_at: float | None = None, answer: bytes = b"",
    ) -> None:
        """Give the counters back and tell the policy; later calls do nothing.

        ``first_byte_at`` is the ``time.perf_counter()`` reading when the instance's first
        response byte arrived; ``answer`` the body, or a stream's last chunks, for ``usage``.
        """
        if self.released:
            return
        self.released = True
        load = self.instance.load
        load.requests = max(0, load.requests - 1)
        load.tokens = max(0, load.tokens - self.request.token_estimate)
        started = self.started
        result = RequestResult(
            self.request, self.instance, outcome, status, streamed,
            None if first_byte_at is None else first_byte_at - started,
            time.perf_counter() - started, answer,
        )
        self.selector.finished(self, outcome)
        try:
            self.policy.release(result)
        except Exception:  # a policy bug must not leak the lease's other effects
            log.exception("policy release failed", policy=self.policy.name,
                          plugin=self.selector.plugin_of(self.request.role))


class NoInstance(Exception):
    """No healthy instance of the needed role is available.

    The proxy answers ``status`` with an error body of ``type``, and a ``Retry-After:
    retry_after`` header when that is set.
    """

    status: int = 503
    type: str = "service_unavailable"
    retry_after: int | None = None

    def __init__(self, role: Role, message: str = "") -> None:
        super().__init__(message or f"no healthy {role.value} instance available")
        self.role = role


class PolicyFailed(NoInstance):
    """The selection policy raised, or returned something that is not a candidate: 500."""

    status = 500
    type = "internal_error"


class Saturated(NoInstance):
    """Every candidate has ``proxy.max-inflight-per-instance`` requests in flight: 429."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, role: Role, limit: int, retry_after: int) -> None:
        super().__init__(role, f"every {role.value} instance has {limit} requests in flight "
                               f"(proxy.max-inflight-per-instance); retry after {retry_after}s")
        self.retry_after = retry_after


class Selector:
    """Holds one policy per role, the in-flight leases (for targeted aborts: ``inflight`` maps
    a client's request id to every lease it holds, one in mixed mode, a prefill and a decode
    one in splitwise mode) and the outlier detector the leases' outcomes feed.

    ``config`` supplies ``outlier:`` and ``proxy.max-inflight-per-instance`` (defaults when
    omitted); ``clock`` is the detector's.
    """

    def __init__(
        self,
        instances: InstanceRegistry,
        policies: Mapping[Role, SelectionPolicy],
        metrics: RouterMetrics,
        config: RouterConfig | None = None,
        clock: Callable[[], float] = time.time,
        plugins: Mapping[Role, str] | None = None,
    ) -> None:
        config = config or RouterConfig.model_validate({})
        self.instances = instances
        self.policies = dict(policies)
        # The plugin that registered each role's policy, for error messages.
        self.plugins = dict(plugins or {})
        self.metrics = metrics
        self.inflight: dict[str, list[Lease]] = {}
        self.outliers = OutlierDetector(config.outlier, clock)
        self.max_inflight = config.proxy.max_inflight_per_instance
        self.retry_after = config.proxy.retry_after_secs
        metrics.track_ejections(self.outliers.is_ejected)
        instances.on_remove(self._forget)

    async def acquire(
        self, request: RouteRequest, exclude: frozenset[str] = frozenset(), *,
        admit: Callable[[Instance], str | None] | None = None, upstream_id: str = "",
        also: Role | None = None,
    ) -> Lease:
        """Pick an instance for ``request`` (skipping urls in ``exclude``) and count it in.

        ``admit`` (when given) names why an instance cannot take the request (None: it can);
        when it turns every candidate away, :class:`NoInstance` carries its reasons.
        ``upstream_id``: the id the instance is sent, when not the request's own. ``also``:
        instances of this role are candidates too (the policy of ``request.role`` picks).
        """
        role = request.role
        candidates = self.instances.healthy(role)
        if also is not None:
            candidates = (*candidates, *self.instances.healthy(also))
        if exclude:
            candidates = tuple(i for i in candidates if i.url not in exclude)
        if not candidates:
            raise NoInstance(role)
        if admit is not None:
            problems = {i.url: admit(i) for i in candidates}
            admitted = tuple(i for i in candidates if problems[i.url] is None)
            if not admitted:
                raise NoInstance(role, f"no {role.value} instance can take this request: "
                                 + "; ".join(f"{url}: {why}" for url, why in problems.items()))
            candidates = admitted
        candidates = self.outliers.admit(candidates)
        cap = self.max_inflight
        if cap:
            candidates = tuple(i for i in candidates if i.load.requests < cap)
            if not candidates:
                raise Saturated(role, cap, self.retry_after)
        policy = self.policies[role]
        try:
            instance = await policy.select(request, candidates)
        except Exception as exc:
            log.exception("policy select failed", policy=policy.name, plugin=self.plugin_of(role),
                          request_id=request.request_id)
            raise PolicyFailed(role, f"selection policy {policy.name!r} (plugin "
                               f"{self.plugin_of(role)!r}) failed: {type(exc).__name__}: "
                               f"{exc}") from None
        if instance not in candidates:
            log.error("policy returned a non-candidate", policy=policy.name,
                      plugin=self.plugin_of(role), returned=repr(instance)[:200])
            raise PolicyFailed(role, f"selection policy {policy.name!r} (plugin "
                               f"{self.plugin_of(role)!r}) returned {type(instance).__name__}, "
                               "not one of the candidates it was given")
        if cap and instance.load.requests >= cap:  # filled by another request while selecting
            raise Saturated(role, cap, self.retry_after)
        self.metrics.child(self.metrics.selections, policy.name, role.value, instance.url).inc()
        lease = Lease(self, request, instance, policy, upstream_id)
        self.inflight.setdefault(request.request_id, []).append(lease)
        return lease

    async def acquire_pair(
        self, prefill: RouteRequest, decode: RouteRequest, exclude: frozenset[str],
        compatible: Callable[[Instance, Instance], str | None], upstream_id: str = "",
    ) -> tuple[Lease, Lease]:
        """A prefill lease, then a decode lease among the decode instances ``compatible``
        with it (None: they can pair; else why not). If no decode instance can be had, the
        prefill lease is released (as not the instance's fault) before the error goes up."""
        p = await self.acquire(prefill, exclude, upstream_id=upstream_id)
        try:
            d = await self.acquire(decode, exclude, upstream_id=upstream_id,
                                   admit=lambda i: compatible(p.instance, i))
        except BaseException:
            p.release(Outcome.DISCONNECT)
            raise
        return p, d

    def finished(self, lease: Lease, outcome: Outcome) -> None:
        """Forget a released lease and count its outcome (called by :meth:`Lease.release`)."""
        rid = lease.request.request_id
        held = self.inflight.get(rid)
        if held is not None and lease in held:
            held.remove(lease)
            if not held:
                del self.inflight[rid]
        instance = lease.instance
        if self.outliers.record(instance, outcome, self.instances.healthy(instance.role)):
            self.metrics.child(self.metrics.ejections, instance.url).inc()
            breaker = self.outliers.breaker(instance.url)
            log.warning("instance ejected", instance=instance.url, ejections=breaker.ejections,
                        until=round(breaker.ejected_until, 3))

    def plugin_of(self, role: Role) -> str:
        """The plugin whose policy serves ``role`` ("unknown" when not told)."""
        return self.plugins.get(role, "unknown")

    def _forget(self, instance: Instance) -> None:
        self.outliers.forget(instance.url)
        for policy in self.policies.values():
            policy.forget(instance)
