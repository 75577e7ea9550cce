"""Base classes for plugin components: config and context kept, no-op defaults for the rest.

Subclass one, set ``name`` (and ``Config`` when the component takes options) and implement the
family's required methods (see :mod:`fdcore.families`); every other method of the family's
Protocol has a harmless default here, so a method added to a Protocol later arrives with a
default and breaks no plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from fdcore.types import (
    EmptyConfig,
    HealthContext,
    Instance,
    PolicyContext,
    RequestResult,
    RouteRequest,
    SchedulerContext,
    StrictModel,
    TransportContext,
)

ConfigT = TypeVar("ConfigT", bound=StrictModel)
F = TypeVar("F", bound=Callable[..., Any])


def required(method: F) -> F:
    """Mark a base-class placeholder that a subclass must override: the registry reports a
    class that inherits it as not following its family's Protocol."""
    method._fdcore_required = True  # type: ignore[attr-defined]
    return method


class BasePolicy(Generic[ConfigT]):
    """Base of a :class:`~fdcore.types.SelectionPolicy`; implement ``select``.

    Generic in its config model, so ``self.config`` is typed::

        class Pinned(BasePolicy[PinnedConfig]):
            name = "pinned"
            Config = PinnedConfig
    """

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]] = EmptyConfig

    def __init__(self, config: ConfigT, context: PolicyContext) -> None:
        self.config = config
        self.context = context

    async def start(self) -> None:
        """No background work by default."""

    async def stop(self) -> None:
        """No background work by default."""

    @required
    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """Return one of ``candidates``; subclasses must override."""
        raise NotImplementedError

    def release(self, result: RequestResult) -> None:
        """Nothing to release by default: the router keeps the shared counters."""

    def forget(self, instance: Instance) -> None:
        """No per-instance state by default."""


class BaseHealthCheck(Generic[ConfigT]):
    """Base of a :class:`~fdcore.types.HealthCheck`; implement ``check``.

    The host bounds each ``check`` by ``context.timeout`` and counts an exception as a failed
    check, so a check needs no timeout or catch-all of its own.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]] = EmptyConfig

    def __init__(self, config: ConfigT, context: HealthContext) -> None:
        self.config = config
        self.context = context

    async def start(self) -> None:
        """Nothing to open by default."""

    async def stop(self) -> None:
        """Nothing to close by default."""


class BaseScheduler(Generic[ConfigT]):
    """Base of a :class:`~fdcore.types.Scheduler`; implement the queue methods
    (``put_requests``, ``get_requests``, ``put_results``, ``get_results``, ``abort``,
    ``get_unhandled_request_num``)."""

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]] = EmptyConfig

    def __init__(self, config: ConfigT, context: SchedulerContext) -> None:
        self.config = config
        self.context = context

    async def start(self) -> None:
        """No background work by default."""

    async def stop(self) -> None:
        """No background work by default."""

    def health(self) -> str | None:
        """Always able to take work by default."""
        return None


class BaseTransport(Generic[ConfigT]):
    """Base of a :class:`~fdcore.types.Transport`; implement ``expose`` and ``connect``.

    By default it allocates nothing (the engine allocates its pool) and has nothing to open.
    """

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]] = EmptyConfig

    def __init__(self, config: ConfigT, context: TransportContext) -> None:
        self.config = config
        self.context = context

    def allocate(self, layout: Any) -> Any | None:
        """Leave the pool's allocation to the engine."""
        return None

    async def start(self) -> None:
        """Nothing to open by default."""

    async def stop(self) -> None:
        """Nothing to close by default."""
