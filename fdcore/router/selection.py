"""Choosing instances through the selection policies, with counters that are always released."""

from __future__ import annotations

from collections.abc import Mapping

from fdcore.router.instances import InstanceRegistry
from fdcore.router.metrics import RouterMetrics
from fdcore.types import Instance, Outcome, Role, RouteRequest, SelectionPolicy


class Lease:
    """One request's claim on an instance: counted in on creation, counted out exactly once."""

    __slots__ = ("instance", "policy", "released", "request", "selector")

    def __init__(
        self, selector: Selector, request: RouteRequest, instance: Instance, policy: SelectionPolicy
    ) -> None:
        self.selector = selector
        self.request = request
        self.instance = instance
        self.policy = policy
        self.released = False
        load = instance.load
        load.requests += 1
        load.tokens += request.token_estimate

    def release(self, outcome: Outcome) -> None:
        """Give the counters back and tell the policy; later calls do nothing."""
        if self.released:
            return
        self.released = True
        load = self.instance.load
        load.requests = max(0, load.requests - 1)
        load.tokens = max(0, load.tokens - self.request.token_estimate)
        self.selector.finished(self)
        self.policy.release(self.request, self.instance, outcome)


class NoInstance(Exception):
    """No healthy instance of the needed role is available."""

    def __init__(self, role: Role) -> None:
        super().__init__(f"no healthy {role.value} instance available")
        self.role = role


class Selector:
    """Holds one policy per role and the in-flight leases (for targeted aborts)."""

    def __init__(
        self,
        instances: InstanceRegistry,
        policies: Mapping[Role, SelectionPolicy],
        metrics: RouterMetrics,
    ) -> None:
        self.instances = instances
        self.policies = dict(policies)
        self.metrics = metrics
        self.inflight: dict[str, Lease] = {}
        instances.on_remove(self._forget)

    async def acquire(self, request: RouteRequest, exclude: frozenset[str] = frozenset()) -> Lease:
        """Pick an instance for ``request`` (skipping urls in ``exclude``) and count it in."""
        role = request.role
        candidates = self.instances.healthy(role)
        if exclude:
            candidates = tuple(i for i in candidates if i.url not in exclude)
        if not candidates:
            raise NoInstance(role)
        policy = self.policies[role]
        instance = await policy.select(request, candidates)
        self.metrics.child(self.metrics.selections, policy.name, role.value, instance.url).inc()
        lease = Lease(self, request, instance, policy)
        self.inflight[request.request_id] = lease
        return lease

    def finished(self, lease: Lease) -> None:
        """Forget a released lease (called by :meth:`Lease.release`)."""
        if self.inflight.get(lease.request.request_id) is lease:
            del self.inflight[lease.request.request_id]

    def _forget(self, instance: Instance) -> None:
        for policy in self.policies.values():
            policy.forget(instance)
