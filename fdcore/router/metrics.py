"""The router's Prometheus metrics, in a registry owned by one app."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fdcore.router.instances import InstanceRegistry

# The *_created series double the output and nobody dashboards them.
disable_created_metrics()

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)


class _InstanceCollector(Collector):
    """Reads in-flight counters and health straight from the registry at scrape time, so the
    request path pays nothing for these gauges."""

    def __init__(self, instances: InstanceRegistry) -> None:
        self._instances = instances
        self.ejected: Callable[[str], bool] = lambda url: False

    def collect(self) -> Iterator[Metric]:
        inflight = GaugeMetricFamily(
            "fdcore_router_inflight_requests", "Requests in flight per instance",
            labels=["instance", "role"],
        )
        tokens = GaugeMetricFamily(
            "fdcore_router_inflight_tokens", "Prompt tokens (estimated) in flight per instance",
            labels=["instance", "role"],
        )
        healthy = GaugeMetricFamily(
            "fdcore_router_instance_healthy", "1 if the instance is in selection, else 0",
            labels=["instance", "role"],
        )
        ejected = GaugeMetricFamily(
            "fdcore_router_instance_ejected",
            "1 while outlier detection keeps the instance out of selection, else 0",
            labels=["instance", "role"],
        )
        for instance in self._instances.instances():
            labels = [instance.url, instance.role.value]
            inflight.add_metric(labels, instance.load.requests)
            tokens.add_metric(labels, instance.load.tokens)
            healthy.add_metric(labels, 1.0 if instance.healthy else 0.0)
            ejected.add_metric(labels, 1.0 if self.ejected(instance.url) else 0.0)
        yield inflight
        yield tokens
        yield healthy
        yield ejected


class RouterMetrics:
    """Counters and histograms the proxy updates, plus scrape-time instance gauges.

    FastDeploy's ``inference_requests_total`` and ``http_requests_total`` are kept under their
    names so existing dashboards work.
    """

    def __init__(self, instances: InstanceRegistry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            "fdcore_router_requests", "Requests by endpoint and status",
            ["endpoint", "status"], registry=reg,
        )
        self.http_requests = Counter(
            "http_requests", "HTTP requests (FastDeploy name)",
            ["method", "endpoint", "status_code"], registry=reg,
        )
        self.inference_requests = Counter(
            "inference_requests", "Proxied inference requests (FastDeploy name)",
            ["mixed_worker", "prefill_worker", "decode_worker", "status_code"], registry=reg,
        )
        self.latency = Histogram(
            "fdcore_router_request_duration_seconds", "End-to-end latency through the router",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=reg,
        )
        self.ttfb = Histogram(
            "fdcore_router_time_to_first_byte_seconds",
            "Time from receiving a request to the first byte of the instance's answer",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=reg,
        )
        self.selections = Counter(
            "fdcore_router_selections", "Instances chosen, by policy and role",
            ["policy", "role", "instance"], registry=reg,
        )
        self.retries = Counter(
            "fdcore_router_retries", "Attempts moved to another instance after a connect failure",
            ["instance"], registry=reg,
        )
        self.ejections = Counter(
            "fdcore_router_ejections", "Times outlier detection took the instance out of "
            "selection", ["instance"], registry=reg,
        )
        self.pd_decisions = Counter(
            "fdcore_router_pd_decisions", "Splitwise mode: how each attempt was served "
            "(disaggregated: a prefill/decode pair; alone: one instance, no hand-off) "
            "and why", ["decision", "reason"], registry=reg,
        )
        self.pd_reschedules = Counter(
            "fdcore_router_pd_reschedules", "Splitwise mode: attempts retried on a new pair, "
            "by the side that failed", ["side"], registry=reg,
        )
        self._collector = _InstanceCollector(instances)
        reg.register(self._collector)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the request path calls this several times."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def track_ejections(self, ejected: Callable[[str], bool]) -> None:
        """Read ``fdcore_router_instance_ejected`` from ``ejected(url)`` at scrape time."""
        self._collector.ejected = ejected

    def count_request(self, endpoint: str, status: int, method: str = "POST") -> None:
        """Count a finished request under fdcore's and FastDeploy's names."""
        code = str(status)
        self.child(self.requests, endpoint, code).inc()
        self.child(self.http_requests, method, endpoint, code).inc()
