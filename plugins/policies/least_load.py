"""Shared argmin helpers for the load-based policies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from fdcore.policies import BasePolicy
from fdcore.types import Instance, RouteRequest


class _Ordered(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


class LeastLoadPolicy(BasePolicy):
    """Picks the candidate with the smallest :meth:`load`; the first in url order wins ties.

    FastDeploy's counter policies all have this shape and differ only in what they count.
    """

    def load(self, instance: Instance) -> float:
        """The quantity minimised; subclasses define it."""
        raise NotImplementedError

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """Return the least-loaded candidate (``min`` keeps the first of equals)."""
        return min(candidates, key=self.load)


def rotating_argmin(keys: Sequence[_Ordered], turn: int) -> int:
    """Index of a smallest key; ties go to the ``turn``-th of the tied indices, cyclically.

    Breaking ties by position always favours the first url, which is how cold traffic piles
    onto one instance; callers pass a counter so successive ties take turns instead.
    """
    best = min(keys)
    tied = [i for i, key in enumerate(keys) if not best < key]
    return tied[turn % len(tied)]
