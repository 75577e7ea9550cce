"""``round_robin``: cycle through the healthy instances."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import fdcore
from fdcore.policies import BasePolicy
from fdcore.registry import Register
from fdcore.types import Instance, PolicyContext, RouteRequest, StrictModel


class RoundRobinPolicy(BasePolicy):
    """Takes candidates in turn: ``candidates[counter % len(candidates)]``, one counter per role."""

    name = "round_robin"

    def __init__(self, config: StrictModel, context: PolicyContext) -> None:
        super().__init__(config, context)
        self._counter = itertools.count()

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """Return the next candidate in turn."""
        return candidates[next(self._counter) % len(candidates)]


@fdcore.hookimpl
def fdcore_register_policies(register: Register) -> None:
    """Register ``round_robin``."""
    register.add_policy(RoundRobinPolicy)
