"""``fd_remote_metrics_score``: ``fd_metrics_score`` on load scraped from the instances."""

from __future__ import annotations

from typing import ClassVar

import fdcore
from fdcore.registry import Register
from fdcore.types import StrictModel

from .fd_metrics_score import FdMetricsScorePolicy, MetricsScoreConfig
from .metrics_scraper import ScrapeConfig
from .remote_loads import RemoteLoadsMixin


class RemoteMetricsScoreConfig(MetricsScoreConfig, ScrapeConfig):
    """``waiting-weight`` plus the scrape options."""


class FdRemoteMetricsScorePolicy(RemoteLoadsMixin, FdMetricsScorePolicy):
    """Argmin of ``running + waiting * waiting-weight`` read from each instance's ``/metrics``.

    Scraped in the background (see :class:`~.remote_loads.RemoteLoadsMixin`); an instance
    without a fresh sample is scored on the router's counters.
    """

    name = "fd_remote_metrics_score"
    Config: ClassVar[type[StrictModel]] = RemoteMetricsScoreConfig
    config: RemoteMetricsScoreConfig


@fdcore.hookimpl
def fdcore_register_policies(register: Register) -> None:
    """Register ``fd_remote_metrics_score``."""
    register.add_policy(FdRemoteMetricsScorePolicy)
