"""Helpers for selection-policy authors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from fdcore.types import EmptyConfig, Instance, Outcome, PolicyContext, RouteRequest, StrictModel


class BasePolicy:
    """A convenient base: stores config and context, no background work, nothing to release.

    Subclasses set ``name`` (and ``Config`` when they take options) and implement ``select``.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]] = EmptyConfig

    def __init__(self, config: StrictModel, context: PolicyContext) -> None:
        self.config = config
        self.context = context

    async def start(self) -> None:
        """No background work by default."""

    async def stop(self) -> None:
        """No background work by default."""

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """Pick one of ``candidates``; subclasses must override."""
        raise NotImplementedError

    def release(self, request: RouteRequest, instance: Instance, outcome: Outcome) -> None:
        """Nothing to release by default: the router keeps the shared counters."""

    def forget(self, instance: Instance) -> None:
        """No per-instance state by default."""
