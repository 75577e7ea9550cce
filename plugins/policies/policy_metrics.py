"""Prometheus collectors the default policies report into the router's registry.

A router builds one policy object per role, often several of the same class, all handed the same
``CollectorRegistry``; a registry refuses a second collector of the same name, so the collectors
are created once per registry and shared. Every series is labelled with the policy and role.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from prometheus_client import CollectorRegistry, Counter, Gauge


class PolicyMetrics:
    """The policies' collectors in one registry (``None``: collectors registered nowhere)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.scrapes = Counter(
            "fdcore_policy_metrics_scrape",
            "Scrapes of an instance's /metrics by a policy, by result "
            "(ok, error, timeout, invalid)",
            ["policy", "role", "instance", "result"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "fdcore_policy_metrics_fallback",
            "Decisions that used the router's own counters for an instance because its scraped "
            "metrics were missing, failed or older than metrics-max-age-secs",
            ["policy", "role", "instance"],
            registry=registry,
        )
        self.tokenizer_fallbacks = Counter(
            "fdcore_policy_tokenizer_fallback",
            "Prompts hashed as characters because the tokenizer-url call failed, by reason",
            ["policy", "role", "reason"],
            registry=registry,
        )
        self.decisions = Counter(
            "fdcore_policy_cache_aware_decisions",
            "Cache-aware decisions by branch: hit (best prefix match), miss (no useful "
            "prefix: least loaded), spill (a better match was over the load bound), "
            "imbalance (load-factor 0: load spread too wide, least tokens)",
            ["policy", "role", "branch"],
            registry=registry,
        )
        self.tree_blocks = Gauge(
            "fdcore_policy_radix_tree_blocks",
            "Block hashes held in a cache-aware policy's radix tree",
            ["policy", "role"],
            registry=registry,
        )


_BY_REGISTRY: WeakKeyDictionary[Any, PolicyMetrics] = WeakKeyDictionary()


def policy_metrics(registry: CollectorRegistry | None) -> PolicyMetrics:
    """The shared :class:`PolicyMetrics` of ``registry``, created on first use."""
    if registry is None:
        return PolicyMetrics(None)
    metrics = _BY_REGISTRY.get(registry)
    if metrics is None:
        metrics = _BY_REGISTRY[registry] = PolicyMetrics(registry)
    return metrics
