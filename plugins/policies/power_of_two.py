"""``power_of_two``: the less busy of two random instances."""

from __future__ import annotations

import random
from collections.abc import Sequence

import fdcore
from fdcore.policies import BasePolicy
from fdcore.registry import Register
from fdcore.types import Instance, PolicyContext, RouteRequest, StrictModel


class PowerOfTwoPolicy(BasePolicy):
    """Samples two distinct candidates and keeps the one with fewer requests in flight.

    On a tie the first sampled wins. Sampling keeps herds off the single least-loaded instance
    while still steering away from busy ones.
    """

    name = "power_of_two"

    def __init__(self, config: StrictModel, context: PolicyContext) -> None:
        super().__init__(config, context)
        # A generator of its own, so tests and embedders can seed this policy alone.
        self.rng = random.Random()

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """Return the less loaded of two distinct random candidates."""
        if len(candidates) == 1:
            return candidates[0]
        i, j = self.rng.sample(range(len(candidates)), 2)
        first, second = candidates[i], candidates[j]
        return second if second.load.requests < first.load.requests else first


@fdcore.hookimpl
def fdcore_register_policies(register: Register) -> None:
    """Register ``power_of_two``."""
    register.add_policy(PowerOfTwoPolicy)
