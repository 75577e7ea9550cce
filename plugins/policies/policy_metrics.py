"""Prometheus collectors the default policies report into the router's registry.

A router builds one policy object per role, often several of the same class, all handed the same
``CollectorRegistry``; the policies make these collectors through ``context.metrics_once``
(:mod:`fdcore.metrics`), so they exist once per app and are shared. Every series is labelled
with the policy and role.
"""

from __future__ import annotations

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
