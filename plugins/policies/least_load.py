"""Shared argmin helpers for the load-based policies."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Protocol

from fdcore.policies import BasePolicy
from fdcore.types import Instance, PolicyContext, RouteRequest, StrictModel


class _Ordered(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


class LeastLoadPolicy(BasePolicy):
    """Picks the candidate with the smallest :meth:`load`; tied candidates take turns.

    FastDeploy's counter policies all have this shape and differ only in what they count.
    FastDeploy gives every tie to the first url, so at low concurrency (every counter 0) one
    instance takes all traffic; here successive ties rotate over the tied candidates.
    """

    def __init__(self, config: StrictModel, context: PolicyContext) -> None:
        super().__init__(config, context)
        self._turn = itertools.count()

    def load(self, instance: Instance) -> float:
        """The quantity minimised; subclasses define it."""
        raise NotImplementedError

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """Return a least-loaded candidate."""
        loads = [self.load(c) for c in candidates]
        return candidates[rotating_argmin(loads, next(self._turn))]


def rotating_argmin(keys: Sequence[_Ordered], turn: int) -> int:
    """Index of a smallest key; ties go to the ``turn``-th of the tied indices, cyclically.

    Breaking ties by position always favours the first url, which is how cold traffic piles
    onto one instance; callers pass a counter so successive ties take turns instead.
    """
    best = min(keys)
    tied = [i for i, key in enumerate(keys) if not best < key]
    return tied[turn % len(tied)]
