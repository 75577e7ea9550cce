"""``fd_metrics_score``: argmin of ``running + waiting * waiting-weight`` from the router's view."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

import fdcore
from fdcore.registry import Register
from fdcore.types import Instance, StrictModel

from .least_load import LeastLoadPolicy


class MetricsScoreConfig(StrictModel):
    """Options of the metrics-score policies."""

    waiting_weight: float = Field(1.0, ge=0)
    """How much a queued request counts against an instance relative to a running one."""


class FdMetricsScorePolicy(LeastLoadPolicy):
    """Argmin of ``running + waiting * waiting-weight``; tied candidates take turns.

    From the router's side ``running`` is the request counter and ``waiting`` is 0: the router
    cannot tell a request the engine is running from one it has queued without knowing the
    engine's batch capacity, so the score equals ``request_num``'s, as in FastDeploy's current
    router. ``fd_remote_metrics_score`` reads both numbers from the engines instead.
    """

    name = "fd_metrics_score"
    Config: ClassVar[type[StrictModel]] = MetricsScoreConfig
    config: MetricsScoreConfig

    def metrics(self, instance: Instance) -> tuple[float, float]:
        """``(running, waiting)`` of ``instance``."""
        return instance.load.requests, 0.0

    def load(self, instance: Instance) -> float:
        """The score: ``running + waiting * waiting-weight``."""
        running, waiting = self.metrics(instance)
        return running + waiting * self.config.waiting_weight


@fdcore.hookimpl
def fdcore_register_policies(register: Register) -> None:
    """Register ``fd_metrics_score``."""
    register.add_policy(FdMetricsScorePolicy)
