"""The health manager: periodic checks through the health-check plugin, thresholds across rounds."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from fdcore.config import ManagerConfig
from fdcore.router.instances import InstanceRegistry
from fdcore.tasks import cancel_and_wait
from fdcore.types import HealthCheck, Instance

log = structlog.get_logger("fdcore.health")


@dataclass(slots=True)
class Streak:
    """Consecutive results for one instance, carried from round to round."""

    successes: int = 0
    failures: int = 0
    detail: str = "not checked yet"
    failing_since: float | None = None  # monotonic time of the first failure while unhealthy


class HealthManager:
    """Checks every instance each interval and flips its health after enough rounds in a row.

    An instance turns unhealthy after ``health-failure-threshold`` consecutive failed rounds and
    healthy again after ``health-success-threshold`` consecutive good ones; unhealthy instances
    stay registered (out of selection) so they come back on their own, until they have failed
    for ``remove-unhealthy-after-secs`` (when not 0): then they are removed.
    """

    def __init__(
        self, registry: InstanceRegistry, check: HealthCheck, config: ManagerConfig,
        plugin: str = "unknown",
    ) -> None:
        self.registry = registry
        self.check = check
        self.config = config
        self.plugin = plugin  # the plugin that registered ``check``, for logs
        self._abandoned: set[asyncio.Task[tuple[bool, str]]] = set()
        self.streaks: dict[str, Streak] = {}
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0
        self._round_done = asyncio.Condition()
        registry.on_remove(self._forget)

    async def start(self) -> None:
        """Start the check loop (the first round runs at once)."""
        await self.check.start()
        self._task = asyncio.create_task(self._loop(), name="fdcore-health")

    async def stop(self) -> None:
        """Stop the loop and the check plugin."""
        await cancel_and_wait(self._task)
        await self.check.stop()

    async def probe(self, instance: Instance) -> tuple[bool, str]:
        """One check of one instance, bounded by ``health-check-timeout-secs`` whatever the
        plugin does: a check still running then is cancelled and left behind (one that ignores
        the cancellation cannot hold the round), and one that raises counts as failed."""
        timeout = self.config.health_check_timeout_secs
        task = asyncio.ensure_future(self.check.check(instance))
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            self._abandoned.add(task)
            task.add_done_callback(self._reap)
            return False, f"timed out after {timeout:g}s (manager.health-check-timeout-secs)"
        try:
            result = task.result()
        except Exception as exc:  # a plugin bug must not take the router down
            log.warning("health check raised", check=self.check.name, plugin=self.plugin,
                        instance=instance.url, error=f"{type(exc).__name__}: {exc}")
            return False, f"health check raised {type(exc).__name__}: {exc}"
        if not (isinstance(result, tuple) and len(result) == 2):
            log.warning("health check returned a bad value", check=self.check.name,
                        plugin=self.plugin, returned=repr(result)[:200])
            return False, f"health check {self.check.name!r} returned {type(result).__name__}"
        return bool(result[0]), str(result[1])

    def _reap(self, task: asyncio.Task[tuple[bool, str]]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("health check failed after its timeout", check=self.check.name,
                        plugin=self.plugin, error=repr(task.exception()))

    async def check_all(self) -> None:
        """Run one round over every registered instance and apply the thresholds."""
        instances = list(self.registry.instances())
        results = await asyncio.gather(*(self.probe(i) for i in instances))
        for instance, (ok, detail) in zip(instances, results, strict=True):
            self.record(instance, ok, detail)
        self._remove_long_unhealthy(time.monotonic())
        async with self._round_done:
            self.rounds += 1
            self._round_done.notify_all()

    async def wait_rounds(self, count: int = 1) -> None:
        """Wait until ``count`` more rounds have completed."""
        async with self._round_done:
            target = self.rounds + count
            await self._round_done.wait_for(lambda: self.rounds >= target)

    def record(self, instance: Instance, ok: bool, detail: str) -> None:
        """Count one result and flip the instance's health when a threshold is reached."""
        streak = self.streaks.setdefault(instance.url, Streak())
        streak.detail = detail
        if ok:
            streak.successes += 1
            streak.failures = 0
            streak.failing_since = None
            if not instance.healthy and streak.successes >= self.config.health_success_threshold:
                self.registry.set_healthy(instance, True)
                log.info("instance healthy", instance=instance.url, role=instance.role.value)
        else:
            streak.failures += 1
            streak.successes = 0
            if instance.healthy and streak.failures >= self.config.health_failure_threshold:
                self.registry.set_healthy(instance, False)
                log.warning(
                    "instance unhealthy", instance=instance.url, role=instance.role.value,
                    detail=detail, failures=streak.failures,
                )
            if not instance.healthy and streak.failing_since is None:
                streak.failing_since = time.monotonic()

    def _remove_long_unhealthy(self, now: float) -> None:
        limit = self.config.remove_unhealthy_after_secs
        if not limit:
            return
        for url, streak in list(self.streaks.items()):
            if streak.failing_since is not None and now - streak.failing_since >= limit:
                instance = self.registry.remove(url)  # policies and this manager forget it
                self.streaks.pop(url, None)
                if instance is not None:
                    log.warning(
                        "instance removed", instance=url, role=instance.role.value,
                        unhealthy_secs=round(now - streak.failing_since, 1), detail=streak.detail,
                    )

    def _forget(self, instance: Instance) -> None:
        self.streaks.pop(instance.url, None)

    def detail(self, instance: Instance) -> str:
        """The last check's detail for an instance."""
        streak = self.streaks.get(instance.url)
        return streak.detail if streak else "not checked yet"

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:
                log.exception("health round failed")
            await asyncio.sleep(self.config.health_check_interval_secs)
