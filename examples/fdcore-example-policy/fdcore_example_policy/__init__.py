"""Two example policies: ``pinned`` (one preferred instance, least-loaded fallback) and
``fastest_ttfb`` (the instance with the lowest observed time to first byte, see
:mod:`.fastest`)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

import fdcore
from fdcore.bases import BasePolicy
from fdcore.registry import Register
from fdcore.types import Instance, RouteRequest, StrictModel

from .fastest import FastestTTFBPolicy


class PinnedConfig(StrictModel):
    """``scheduler.pinned-port``: the port of the preferred instance."""

    pinned_port: int = Field(ge=1, le=65535)


class PinnedPolicy(BasePolicy[PinnedConfig]):
    """Routes to the instance on ``pinned-port`` while it is a candidate (healthy)."""

    name = "pinned"
    Config = PinnedConfig

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """The pinned instance if healthy, else the one with the fewest requests in flight."""
        port = self.config.pinned_port
        for instance in candidates:
            if instance.port == port:
                return instance
        return min(candidates, key=lambda i: i.load.requests)


@fdcore.hookimpl
def fdcore_register_policies(register: Register) -> None:
    """Register ``pinned`` and ``fastest_ttfb``."""
    register.add_policy(PinnedPolicy)
    register.add_policy(FastestTTFBPolicy)
