"""Load read from the instances' own ``/metrics``, for the ``remote`` policy variants."""

from __future__ import annotations

from collections.abc import Sequence

from fdcore.policies import BasePolicy
from fdcore.types import Instance, PolicyContext, RequestResult, RouteRequest, StrictModel

from .metrics_scraper import MetricsScraper, ScrapeConfig
from .policy_metrics import PolicyMetrics


class RemoteLoadsMixin(BasePolicy):
    """Replaces a policy's ``metrics(instance) -> (running, waiting)`` with scraped values.

    Put it first among the bases: ``class P(RemoteLoadsMixin, LocalPolicy)``; the policy's
    ``Config`` must include :class:`ScrapeConfig`.

    A sample is up to ``metrics-interval-secs`` old, and every request sent since it was taken
    is missing from it; deciding on it alone sends a whole interval's traffic to the instance
    that looked idle. So each instance's running count is credited with the requests this
    policy sent it after its sample's scrape round began and that are still in flight.
    Without a usable sample the router's own counters are used (running = requests in flight,
    waiting = 0) and ``fdcore_policy_metrics_fallback_total`` counts it.
    """

    def __init__(self, config: StrictModel, context: PolicyContext) -> None:
        super().__init__(config, context)
        if not isinstance(config, ScrapeConfig):
            raise TypeError(f"{type(self).__name__}.Config must include ScrapeConfig")
        self._metrics = context.metrics_once(PolicyMetrics)
        self.scraper = MetricsScraper(config, context, self.name, self._metrics)
        # url -> scrape round at dispatch -> requests still in flight.
        self._credit: dict[str, dict[int, int]] = {}
        # (id(request), url) -> scrape round at dispatch; the router holds the request until
        # release, so its id stays unique while the entry exists.
        self._sent: dict[tuple[int, str], int] = {}

    async def start(self) -> None:
        """Start scraping (the first round begins at once)."""
        await super().start()
        await self.scraper.start()

    async def stop(self) -> None:
        """Stop scraping."""
        await self.scraper.stop()
        await super().stop()

    async def refresh(self) -> None:
        """Scrape every instance now and wait for the round to finish."""
        await self.scraper.refresh()

    def in_flight_credit(self) -> int:
        """Requests sent and not yet released that this policy tracks (0 when all ended)."""
        return len(self._sent)

    def metrics(self, instance: Instance) -> tuple[float, float]:
        """``(running, waiting)`` from the last fresh sample, or the router's counters."""
        sample = self.scraper.sample(instance.url)
        if sample is None:
            self._metrics.fallbacks.labels(
                self.name, self.context.role.value, instance.url
            ).inc()
            return instance.load.requests, 0.0
        credit = self._credit.get(instance.url)
        since = sum(n for r, n in credit.items() if r >= sample.round) if credit else 0
        return sample.running + since, sample.waiting

    async def select(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """Choose with the wrapped policy, then credit the choice until it is released."""
        chosen = await super().select(request, candidates)
        round_ = self.scraper.round
        key = (id(request), chosen.url)
        if key not in self._sent:
            self._sent[key] = round_
            counts = self._credit.setdefault(chosen.url, {})
            counts[round_] = counts.get(round_, 0) + 1
        return chosen

    def release(self, result: RequestResult) -> None:
        """Withdraw the request's credit."""
        super().release(result)
        instance = result.instance
        round_ = self._sent.pop((id(result.request), instance.url), None)
        counts = self._credit.get(instance.url)
        if round_ is None or counts is None or round_ not in counts:
            return
        counts[round_] -= 1
        if not counts[round_]:
            del counts[round_]
            if not counts:
                del self._credit[instance.url]

    def forget(self, instance: Instance) -> None:
        """Drop the sample and credit of an instance that left the registry."""
        super().forget(instance)
        self.scraper.forget(instance.url)
        self._credit.pop(instance.url, None)
