"""The router's registry of inference instances."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fdcore.router.addresses import literal
from fdcore.types import Instance, Role

# What an anonymous re-registration may not change on a live instance (docs/router.md).
GUARDED_FIELDS = (
    "role", "port", "metrics_port", "connector_port", "engine_worker_queue_port", "rdma_ports",
)
Endpoint = tuple[str, int]


def guarded_changes(current: Instance, incoming: Instance) -> list[str]:
    """The :data:`GUARDED_FIELDS` in which ``incoming`` differs from ``current``."""
    return [n for n in GUARDED_FIELDS if getattr(current, n) != getattr(incoming, n)]


class InstanceRegistry:
    """Instances by url, with per-role lists of healthy ones kept sorted for selection.

    An instance is also known by its resolved addresses and port, so host aliases
    (``localhost:8001``, ``127.0.0.1:8001``) name one instance, under the url it first
    registered with. The healthy lists are rebuilt only when membership or health changes, so
    the per-request path reads a ready tuple.
    """

    def __init__(self) -> None:
        self._by_url: dict[str, Instance] = {}
        self._by_endpoint: dict[Endpoint, str] = {}
        self._endpoints: dict[str, frozenset[Endpoint]] = {}
        self._healthy: dict[Role, tuple[Instance, ...]] = {role: () for role in Role}
        self._on_remove: list[Callable[[Instance], None]] = []

    def on_remove(self, callback: Callable[[Instance], None]) -> None:
        """Call ``callback(instance)`` whenever an instance leaves the registry."""
        self._on_remove.append(callback)

    def instances(self, role: Role | None = None) -> Sequence[Instance]:
        """Every registered instance, sorted by url, optionally of one role."""
        items = sorted(self._by_url.values(), key=lambda i: i.url)
        return items if role is None else [i for i in items if i.role is role]

    def healthy(self, role: Role) -> tuple[Instance, ...]:
        """Healthy instances of ``role``, sorted by url."""
        return self._healthy[role]

    def get(self, url: str) -> Instance | None:
        """The instance registered under ``url``, if any."""
        return self._by_url.get(url)

    def find(self, url: str, port: int, addresses: frozenset[str] = frozenset()) -> Instance | None:
        """The instance registered under ``url``, or at one of ``addresses`` with ``port``."""
        current = self._by_url.get(url)
        if current is None:
            for address in addresses:
                known = self._by_endpoint.get((address, port))
                if known is not None:
                    return self._by_url[known]
        return current

    def upsert(
        self, incoming: Instance, healthy: bool, addresses: frozenset[str] = frozenset()
    ) -> tuple[Instance, bool]:
        """Add ``incoming`` or update the record it re-registers; return ``(record, is_new)``.

        ``addresses`` are the resolved addresses of its host (an IP address host needs none).
        A re-registration, under any alias, is a heartbeat: it refreshes the payload and
        ``last_seen`` but keeps the url, the live counters and the health the manager decided.
        """
        addresses = addresses or literal(incoming.host_ip)
        current = self.find(incoming.url, incoming.port, addresses)
        if current is None:
            incoming.healthy = healthy
            self._by_url[incoming.url] = incoming
            self._index(incoming.url, frozenset((a, incoming.port) for a in addresses))
            self._rebuild()
            return incoming, True
        if current.url == incoming.url:  # the host may resolve elsewhere now
            self._index(current.url, frozenset((a, incoming.port) for a in addresses))
        role_changed = current.role is not incoming.role
        for name in (
            "role", "metrics_port", "connector_port", "engine_worker_queue_port",
            "transfer_protocol", "rdma_ports", "device_ids", "extra",
        ):
            setattr(current, name, getattr(incoming, name))
        current.last_seen = incoming.last_seen
        if role_changed:
            self._rebuild()
        return current, False

    def set_healthy(self, instance: Instance, healthy: bool) -> bool:
        """Record a health change; return whether anything changed."""
        if instance.healthy == healthy or instance.url not in self._by_url:
            return False
        instance.healthy = healthy
        self._rebuild()
        return True

    def remove(self, url: str) -> Instance | None:
        """Drop an instance; listeners are told so policies forget it."""
        instance = self._by_url.pop(url, None)
        if instance is not None:
            self._index(url, frozenset())
            self._rebuild()
            for callback in self._on_remove:
                callback(instance)
        return instance

    def counts(self) -> dict[str, int]:
        """FastDeploy's ``/registered_number``: instances per role."""
        result = {role.value: 0 for role in Role}
        for instance in self._by_url.values():
            result[instance.role.value] += 1
        return result

    def __len__(self) -> int:
        return len(self._by_url)

    def _index(self, url: str, endpoints: frozenset[Endpoint]) -> None:
        for endpoint in self._endpoints.pop(url, frozenset()):
            if self._by_endpoint.get(endpoint) == url:
                del self._by_endpoint[endpoint]
        if endpoints:
            self._endpoints[url] = endpoints
            for endpoint in endpoints:
                self._by_endpoint.setdefault(endpoint, url)

    def _rebuild(self) -> None:
        ordered = sorted(self._by_url.values(), key=lambda i: i.url)
        self._healthy = {
            role: tuple(i for i in ordered if i.healthy and i.role is role) for role in Role
        }
