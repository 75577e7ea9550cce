"""Background scraping of the instances' Prometheus ``/metrics`` for the remote policies.

Decisions read the last sample from memory; no decision ever waits on HTTP. A failed scrape
drops the instance's sample so decisions fall back to the router's counters at once, and a
sample older than ``metrics-max-age-secs`` is ignored the same way.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field

from fdcore.tasks import cancel_and_wait
from fdcore.types import Instance, PolicyContext, StrictModel

from .policy_metrics import PolicyMetrics

PRESETS: dict[str, tuple[str, str]] = {
    "fastdeploy": ("fastdeploy:num_requests_running", "fastdeploy:num_requests_waiting"),
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    "sglang": ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
}
"""``metrics-preset`` -> (running gauge, waiting gauge) as each engine names them."""


class ScrapeConfig(StrictModel):
    """Options of the policies that read load from the instances' ``/metrics``."""

    metrics_preset: Literal["fastdeploy", "vllm", "sglang"] = "fastdeploy"
    """Which engine's metric names to read (fdcore engines use FastDeploy's)."""
    metrics_running_name: str = ""
    """Gauge of running requests; empty: the preset's."""
    metrics_waiting_name: str = ""
    """Gauge of queued requests; empty: the preset's."""
    metrics_interval_secs: float = Field(1.0, gt=0)
    """Seconds between scrape rounds."""
    metrics_timeout_secs: float = Field(1.0, gt=0)
    """Limit on one scrape of one instance."""
    metrics_max_age_secs: float = Field(5.0, gt=0)
    """A sample older than this is not used; the router's counters are."""

    def metric_names(self) -> tuple[str, str]:
        """(running gauge, waiting gauge) after applying the preset."""
        running, waiting = PRESETS[self.metrics_preset]
        return self.metrics_running_name or running, self.metrics_waiting_name or waiting


class InvalidMetrics(ValueError):
    """A ``/metrics`` page lacks a wanted gauge or has an unparsable line for one."""


def parse_metrics(text: str, names: Sequence[str]) -> dict[str, float]:
    """Sum every sample of each name in ``names`` (labelled series add up).

    Only the lines of the wanted metrics are parsed, so an engine's many histograms cost
    nothing and an odd line elsewhere cannot break the scrape.
    """
    wanted = tuple(names)
    lines = [line for line in text.splitlines() if _is_sample_of(line, wanted)]
    sums: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families("\n".join(lines) + "\n"):
            for sample in family.samples:
                if sample.name in wanted:
                    sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    except ValueError as exc:
        raise InvalidMetrics(f"unparsable metrics: {exc}") from None
    missing = [name for name in wanted if name not in sums]
    if missing:
        raise InvalidMetrics(f"no sample of {', '.join(missing)}")
    if not all(math.isfinite(value) for value in sums.values()):
        raise InvalidMetrics("non-finite sample")
    return sums


def _is_sample_of(line: str, names: tuple[str, ...]) -> bool:
    return any(
        line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ", "\t")
        for name in names
    )


@dataclass(frozen=True, slots=True)
class Sample:
    """One instance's scraped load."""

    running: float
    waiting: float
    round: int
    """The scrape round that took it: it reflects dispatches made before that round began."""
    at: float
    """The scraper's clock (``time.monotonic``) when it was taken."""


class MetricsScraper:
    """Scrapes every healthy instance of one role each ``metrics-interval-secs``."""

    def __init__(
        self, config: ScrapeConfig, context: PolicyContext, policy: str, metrics: PolicyMetrics
    ) -> None:
        self.config = config
        self.context = context
        self.policy = policy
        self.metrics = metrics
        self.round = 0  # rounds started so far
        self.clock: Callable[[], float] = time.monotonic  # replaceable to test staleness
        self._names = config.metric_names()
        self._samples: dict[str, Sample] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the HTTP client and start scraping in the background."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.metrics_timeout_secs)
        )
        self._task = asyncio.create_task(self._run(), name=f"{self.policy} metrics scraper")

    async def stop(self) -> None:
        """Stop scraping and close the HTTP client."""
        await cancel_and_wait(self._task)
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def refresh(self) -> None:
        """Run one scrape round over the role's healthy instances now and wait for it."""
        if self._session is None:
            raise RuntimeError("the scraper is not started")
        self.round += 1
        targets = [i for i in self.context.instances.instances(self.context.role) if i.healthy]
        await asyncio.gather(*(self._scrape(self._session, i, self.round) for i in targets))

    def sample(self, url: str) -> Sample | None:
        """The instance's sample if there is one no older than ``metrics-max-age-secs``."""
        sample = self._samples.get(url)
        if sample is None or self.clock() - sample.at > self.config.metrics_max_age_secs:
            return None
        return sample

    def forget(self, url: str) -> None:
        """Drop the sample of an instance that left the registry."""
        self._samples.pop(url, None)

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.config.metrics_interval_secs)

    async def _scrape(
        self, session: aiohttp.ClientSession, instance: Instance, round_: int
    ) -> None:
        try:
            async with session.get(instance.metrics_url) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, resp.history, status=resp.status
                    )
            values = parse_metrics(body.decode("utf-8", "replace"), self._names)
        except TimeoutError:
            self._failed(instance, round_, "timeout")
        except aiohttp.ClientError:
            self._failed(instance, round_, "error")
        except InvalidMetrics:
            self._failed(instance, round_, "invalid")
        else:
            running, waiting = self._names
            sample = Sample(values[running], values[waiting], round_, self.clock())
            # Rounds can overlap (a manual refresh beside the loop): never go back in time.
            if self._newer(instance.url, round_):
                self._samples[instance.url] = sample
            self._count(instance, "ok")

    def _failed(self, instance: Instance, round_: int, result: str) -> None:
        if self._newer(instance.url, round_):
            self._samples.pop(instance.url, None)
        self._count(instance, result)

    def _newer(self, url: str, round_: int) -> bool:
        current = self._samples.get(url)
        return current is None or current.round <= round_

    def _count(self, instance: Instance, result: str) -> None:
        role = self.context.role.value
        self.metrics.scrapes.labels(self.policy, role, instance.url, result).inc()
