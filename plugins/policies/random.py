"""``random``: a uniformly random healthy instance."""

from __future__ import annotations

import random
from collections.abc import Sequence

import fdcore
from fdcore.policies import BasePolicy
from fdcore.registry import Register
from fdcore.types import Instance, RouteRequest


class RandomPolicy(BasePolicy):
    """Picks uniformly at random from the healthy candidates (one process-wide generator)."""

    name = "random"

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """Return a uniformly random candidate."""
        return candidates[random.randrange(len(candidates))]


@fdcore.hookimpl
def fdcore_register_policies(register: Register) -> None:
    """Register ``random``."""
    register.add_policy(RandomPolicy)
