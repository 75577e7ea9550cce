"""A periodic load summary in the logs (``scheduler.stats-interval-secs``)."""

from __future__ import annotations

import asyncio

import structlog

from fdcore.router.instances import InstanceRegistry
from fdcore.tasks import cancel_and_wait

log = structlog.get_logger("fdcore.stats")


class StatsLogger:
    """Logs in-flight requests per instance every interval while any are in flight."""

    def __init__(self, instances: InstanceRegistry, interval: float) -> None:
        self.instances = instances
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the loop."""
        self._task = asyncio.create_task(self._loop(), name="fdcore-stats")

    async def stop(self) -> None:
        """Stop the loop."""
        await cancel_and_wait(self._task)

    def snapshot(self) -> dict[str, int]:
        """In-flight requests per instance url."""
        return {i.url: i.load.requests for i in self.instances.instances()}

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            running = self.snapshot()
            total = sum(running.values())
            if total:
                log.info("stats", total_running=total, running=running)
