"""The ``pinned`` policy: one preferred instance, least-loaded fallback."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

import fdcore
from fdcore.policies import BasePolicy
from fdcore.registry import Register
from fdcore.types import Instance, RouteRequest, StrictModel


class PinnedConfig(StrictModel):
    """``scheduler.pinned-port``: the port of the preferred instance."""

    pinned_port: int = Field(ge=1, le=65535)


class PinnedPolicy(BasePolicy):
    """Routes to the instance on ``pinned-port`` while it is a candidate (healthy)."""

    name = "pinned"
    Config = PinnedConfig

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """The pinned instance if healthy, else the one with the fewest requests in flight."""
        port = self.config.pinned_port  # type: ignore[attr-defined]
        for instance in candidates:
            if instance.port == port:
                return instance
        return min(candidates, key=lambda i: i.load.requests)


@fdcore.hookimpl
def fdcore_register_policies(register: Register) -> None:
    """Register ``pinned``."""
    register.add_policy(PinnedPolicy)
