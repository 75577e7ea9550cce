"""Prometheus metrics of the P-D hand-off (DESIGN 8.3): held blocks, releases, transfers.

Held blocks and releases are read off :class:`~fdcore.engine.disagg.holds.Holds` at scrape time
(nothing on the hand-off path updates a gauge); transfers are counted as they complete.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fdcore.engine.disagg.holds import Holds, HoldState, ReleaseReason, Side

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _HoldsCollector(Collector):
    def __init__(self, holds: Holds) -> None:
        self.holds = holds

    def collect(self) -> Iterator[Metric]:
        held = GaugeMetricFamily(
            "fdcore_kv_held_blocks",
            "KV blocks held for P-D hand-offs, by side (prefill: source pinned, decode: "
            "reserved) and state (reserved, sending, quarantined)", labels=["side", "state"])
        counts = self.holds.held_blocks()
        for side in Side:
            for state in HoldState:
                held.add_metric([side.value, state.value], counts.get((side, state), 0))
        yield held
        releases = CounterMetricFamily(
            "fdcore_kv_hold_releases", "Holds released, by side and reason",
            labels=["side", "reason"])
        for side in Side:
            for reason in ReleaseReason:
                releases.add_metric([side.value, reason.value],
                                    self.holds.releases.get((side, reason), 0))
        yield releases


class DisaggMetrics:
    """The hand-off's metrics in an engine's registry."""

    def __init__(self, registry: CollectorRegistry, holds: Holds) -> None:
        registry.register(_HoldsCollector(holds))
        self.transfer_bytes = Counter(
            "fdcore_kv_transfer_bytes", "KV bytes moved between engines, by transport and "
            "direction (sent by P, received by D)", ["protocol", "direction"], registry=registry)
        self.transfer_seconds = Histogram(
            "fdcore_kv_transfer_seconds", "Seconds one hand-off's writes took, by transport",
            ["protocol"], buckets=_SECONDS, registry=registry)

    def transferred(self, protocol: str, direction: str, nbytes: int, seconds: float) -> None:
        """Count one completed transfer."""
        self.transfer_bytes.labels(protocol, direction).inc(nbytes)
        if direction == "sent":
            self.transfer_seconds.labels(protocol).observe(seconds)
