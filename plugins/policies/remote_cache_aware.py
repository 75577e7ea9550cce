"""``remote_cache_aware``: ``cache_aware`` with load read from the instances' ``/metrics``."""

from __future__ import annotations

from typing import ClassVar

import fdcore
from fdcore.registry import Register
from fdcore.types import StrictModel

from .cache_aware import CacheAwareConfig, CacheAwarePolicy
from .metrics_scraper import ScrapeConfig
from .remote_loads import RemoteLoadsMixin


class RemoteCacheAwareConfig(CacheAwareConfig, ScrapeConfig):
    """The ``cache_aware`` options plus the scrape options."""


class RemoteCacheAwarePolicy(RemoteLoadsMixin, CacheAwarePolicy):
    """``cache_aware`` whose load is the engine's running + waiting requests.

    Samples come from a background scrape, credited with requests sent since (see
    :class:`~.remote_loads.RemoteLoadsMixin`); without a fresh sample an instance's load is
    the router's own count. The imbalance fallback still compares the router's token counters.
    """

    name = "remote_cache_aware"
    Config: ClassVar[type[StrictModel]] = RemoteCacheAwareConfig
    config: RemoteCacheAwareConfig


@fdcore.hookimpl
def fdcore_register_policies(register: Register) -> None:
    """Register ``remote_cache_aware``."""
    register.add_policy(RemoteCacheAwarePolicy)
