"""Parsing FastDeploy's ``/register`` payload (and ``register.yaml`` entries) into instances."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from fdcore.router.outliers import Breaker, breaker_status
from fdcore.types import Instance, Role

_ROLE_NUMBERS = {0: Role.MIXED, 1: Role.PREFILL, 2: Role.DECODE}
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
PROTOCOLS = frozenset({"ipc", "rdma", "tcp"})
_KNOWN = {
    "role", "host_ip", "port", "connector_port", "engine_worker_queue_port",
    "transfer_protocol", "rdma_ports", "device_ids", "metrics_port",
}


class PayloadError(ValueError):
    """A register payload that cannot be accepted; the message says which field and why."""


def _role(value: Any) -> Role:
    if isinstance(value, bool):
        raise PayloadError("role: must be 'mixed', 'prefill', 'decode' or 0, 1, 2")
    if isinstance(value, int):
        if value in _ROLE_NUMBERS:
            return _ROLE_NUMBERS[value]
    elif isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit() and int(text) in _ROLE_NUMBERS:
            return _ROLE_NUMBERS[int(text)]
        for role in Role:
            if text == role.value:
                return role
    raise PayloadError(f"role: {value!r} is not one of 'mixed', 'prefill', 'decode', 0, 1, 2")


def _port(name: str, value: Any, required: bool = False) -> int:
    """A port; optional ones may be absent, empty or 0, all meaning "not set" (0)."""
    if value is None or value == "":
        if required:
            raise PayloadError(f"{name}: required")
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PayloadError(f"{name}: must be an integer or a numeric string, got {value!r}")
    try:
        port = int(value)
    except ValueError:
        raise PayloadError(f"{name}: {value!r} is not a number") from None
    if not (1 if required else 0) <= port <= 65535:
        raise PayloadError(f"{name}: {port} is outside 1..65535")
    return port


def _str_list(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise PayloadError(f"{name}: must be a list, got {type(value).__name__}")
    items = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise PayloadError(f"{name}: items must be integers or strings, got {item!r}")
        items.append(str(item))
    return items


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PayloadError("host_ip: required (an IP address or host name)")
    host = value.strip()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise PayloadError(f"host_ip: {host!r} is not an IP address or host name") from None
    return host


def instance_url(host: str, port: int) -> str:
    """The url an instance is known by (and proxied to)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def parse_address(payload: Any) -> tuple[str, int]:
    """``(host_ip, port)`` of a register payload (the body of ``/deregister``)."""
    if not isinstance(payload, Mapping):
        raise PayloadError(f"body must be a JSON object, got {type(payload).__name__}")
    return _host(payload.get("host_ip")), _port("port", payload.get("port"), required=True)


def parse_instance(payload: Any, now: float = 0.0) -> Instance:
    """Validate a register payload; ints or strings are accepted wherever FastDeploy does.

    Fields fdcore does not use (``version``, ``tp_size``, ...) are kept in ``Instance.extra``.
    """
    if not isinstance(payload, Mapping):
        raise PayloadError(f"body must be a JSON object, got {type(payload).__name__}")
    if "role" not in payload:
        raise PayloadError("role: required")
    role = _role(payload["role"])
    host, port = parse_address(payload)
    protocols = [
        p.lower() for p in _str_list("transfer_protocol", payload.get("transfer_protocol"))
    ]
    unknown = sorted(set(protocols) - PROTOCOLS)
    if unknown:
        known = ", ".join(sorted(PROTOCOLS))
        raise PayloadError(f"transfer_protocol: unknown {', '.join(unknown)} (known: {known})")
    metrics_port = _port("metrics_port", payload.get("metrics_port")) or port
    return Instance(
        url=instance_url(host, port),
        role=role,
        host_ip=host,
        port=port,
        metrics_port=metrics_port,
        connector_port=_port("connector_port", payload.get("connector_port")),
        engine_worker_queue_port=_port(
            "engine_worker_queue_port", payload.get("engine_worker_queue_port")
        ),
        transfer_protocol=protocols,
        rdma_ports=_str_list("rdma_ports", payload.get("rdma_ports")),
        device_ids=_str_list("device_ids", payload.get("device_ids")),
        extra={k: v for k, v in payload.items() if k not in _KNOWN},
        registered_at=now,
        last_seen=now,
    )


def describe(instance: Instance, outlier: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """FastDeploy's ``/registered`` entry for an instance (ports as strings), plus its state.

    ``outlier`` is its breaker from :meth:`fdcore.router.outliers.OutlierDetector.status`
    (a closed, never-ejected one when omitted).
    """
    if outlier is None:
        outlier = breaker_status(Breaker(), 0.0)
    return {
        "url": instance.url,
        "worker_type": instance.role.value,
        "connector_port": str(instance.connector_port),
        "engine_worker_queue_port": str(instance.engine_worker_queue_port),
        "transfer_protocol": instance.transfer_protocol,
        "rdma_ports": instance.rdma_ports,
        "device_ids": instance.device_ids,
        "metrics_port": str(instance.metrics_port),
        "healthy": instance.healthy,
        "in_flight_requests": instance.load.requests,
        "in_flight_tokens": instance.load.tokens,
        "registered_at": instance.registered_at,
        "last_seen": instance.last_seen,
        **outlier,
    }
