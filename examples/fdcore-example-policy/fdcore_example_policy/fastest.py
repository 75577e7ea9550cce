"""The ``fastest_ttfb`` policy: route to the instance whose first bytes come back soonest.

It learns from what the router measures: every finished request's
:class:`~fdcore.types.RequestResult` carries the time to first byte the router observed, and
the policy keeps an exponentially weighted average of it per instance. An instance it has no
figure for yet is tried first (so a new instance gets traffic); failed requests count as slow.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from fdcore.bases import BasePolicy
from fdcore.types import (
    Instance,
    Outcome,
    PolicyContext,
    RequestResult,
    RouteRequest,
    StrictModel,
)


class FastestConfig(StrictModel):
    """``scheduler.fastest-ttfb-weight`` and ``scheduler.fastest-ttfb-failure-secs``.

    Option keys start with the policy's name, so they cannot collide with another plugin's.
    """

    fastest_ttfb_weight: float = Field(0.3, gt=0, le=1, description="weight of a new sample")
    fastest_ttfb_failure_secs: float = Field(
        10.0, gt=0, description="the sample an error or timeout counts as")


class FastestTTFBPolicy(BasePolicy[FastestConfig]):
    """Lowest average time to first byte wins; ties go to fewer requests in flight."""

    name = "fastest_ttfb"
    Config = FastestConfig

    def __init__(self, config: FastestConfig, context: PolicyContext) -> None:
        super().__init__(config, context)
        self.ttfb: dict[str, float] = {}  # url -> average seconds

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """An instance without a figure yet (the least busy of them), else the fastest on
        average."""
        unknown = [i for i in candidates if i.url not in self.ttfb]
        if unknown:
            return min(unknown, key=lambda i: i.load.requests)
        return min(candidates, key=lambda i: (self.ttfb[i.url], i.load.requests))

    def release(self, result: RequestResult) -> None:
        """Fold this request's time to first byte into its instance's average."""
        if result.outcome is Outcome.DISCONNECT:
            return  # the client left: says nothing about the instance
        if result.outcome is Outcome.SUCCESS and result.ttfb is not None:
            sample = result.ttfb
        else:
            sample = self.config.fastest_ttfb_failure_secs
        url = result.instance.url
        old = self.ttfb.get(url)
        weight = self.config.fastest_ttfb_weight
        self.ttfb[url] = sample if old is None else old + weight * (sample - old)

    def forget(self, instance: Instance) -> None:
        """Drop the figure of an instance that left."""
        self.ttfb.pop(instance.url, None)
