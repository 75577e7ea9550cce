"""Passive outlier ejection: an instance that keeps failing leaves selection for a while.

Envoy's consecutive-5xx / consecutive-gateway-failure detection, free of I/O: the clock is
injected, so every branch is testable exactly. A health check cannot catch an instance whose
``/health`` says 200 while every inference request fails; worse, failing fast makes it look
the least loaded, so load-aware policies send it most of the traffic.

Each instance has a :class:`Breaker`, in one of two states:

* **closed** — in selection. ``consecutive_failures`` counts failures since the last
  success; at ``outlier.consecutive-failures`` the breaker opens, if the cap allows.
* **open** (ejected) — out of selection until ``ejected_until``, for
  ``min(base-ejection-secs * ejections, max-ejection-secs)`` seconds, where ``ejections``
  counts this opening too. Outcomes of requests still in flight are ignored while open, so
  they cannot prolong the ejection. At ``ejected_until`` it is closed again with a count of 0.

What counts: ``Outcome.ERROR`` (a 5xx answer, a connect failure, a broken answer) is a
failure; ``Outcome.SUCCESS`` (any status below 500, 4xx included: the client's fault) resets
the count; ``Outcome.DISCONNECT`` (the client left) and ``Outcome.TIMEOUT`` are ignored. A
timeout is what a busy instance gives under a burst: ejecting it moves its load onto the others
and can cascade (the reliability benchmark saw a healthy engine ejected that way); a stopped
instance is the health check's to take out.

The cap: of ``n`` instances of a role in selection, at most :func:`allowed_ejections` ``(n)``
are ejected at once: ``n`` at 100 %, none at 0 %, otherwise
``min(n - 1, max(1, floor(n * percent / 100)))``. Like Envoy, one instance may be ejected
whatever the percent (from ``n = 2``); unlike Envoy, below 100 % one always stays in.
An instance over the threshold that the cap holds back stays closed; its next failure tries
again.

Fail open: :meth:`OutlierDetector.admit` returns every candidate when all of them are ejected
(possible at 100 %, or when health checks took the others out). A router that sends traffic
to suspect instances degrades; one that answers 503 while instances may be fine is down.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fdcore.config import OutlierConfig
from fdcore.types import Instance, Outcome


class Circuit(enum.StrEnum):
    """A breaker's state as ``/registered`` shows it."""

    CLOSED = "closed"
    OPEN = "open"


@dataclass(slots=True)
class Breaker:
    """One instance's failure count and ejection history (times in the detector's clock)."""

    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0

    def is_open(self, now: float) -> bool:
        """Whether the instance is ejected at ``now``."""
        return now < self.ejected_until


def allowed_ejections(n: int, percent: int) -> int:
    """How many of ``n`` instances may be ejected at once under ``max-ejection-percent``."""
    if percent >= 100:
        return n
    if percent <= 0:
        return 0
    return min(n - 1, max(1, n * percent // 100))


def breaker_status(breaker: Breaker, now: float) -> dict[str, Any]:
    """``breaker`` at ``now`` for ``/registered`` (``ejected_until`` is None while closed)."""
    is_open = breaker.is_open(now)
    return {
        "circuit": (Circuit.OPEN if is_open else Circuit.CLOSED).value,
        "ejected_until": breaker.ejected_until if is_open else None,
        "ejections": breaker.ejections,
        "consecutive_failures": breaker.consecutive_failures,
    }


class OutlierDetector:
    """Breakers by instance url, fed by finished requests and consulted by selection."""

    def __init__(self, config: OutlierConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._breakers: dict[str, Breaker] = {}
        # No breaker is open after this time: selection skips the filter until then.
        self._open_until = 0.0

    def breaker(self, url: str) -> Breaker:
        """The breaker of ``url`` (a fresh closed one if it has none yet)."""
        found = self._breakers.get(url)
        if found is None:
            found = self._breakers[url] = Breaker()
        return found

    def record(self, instance: Instance, outcome: Outcome, pool: Sequence[Instance]) -> bool:
        """Count ``outcome`` of a request ``instance`` served; return whether it was ejected.

        ``pool`` is the instances of its role in selection, the base of the cap.
        """
        if not self.config.enabled or outcome in (Outcome.DISCONNECT, Outcome.TIMEOUT):
            return False
        if outcome is Outcome.SUCCESS:
            # The per-request common case, without a clock read. The count is 0 already while
            # the breaker is open (ejection resets it), so this holds in either state.
            found = self._breakers.get(instance.url)
            if found is not None:
                found.consecutive_failures = 0
            return False
        now = self.clock()
        breaker = self.breaker(instance.url)
        if breaker.is_open(now):
            return False
        breaker.consecutive_failures += 1
        if breaker.consecutive_failures < self.config.consecutive_failures:
            return False
        others = [i for i in pool if i.url != instance.url]
        ejected = sum(1 for i in others if self.is_ejected(i.url, now))
        if ejected >= allowed_ejections(len(others) + 1, self.config.max_ejection_percent):
            return False
        breaker.ejections += 1
        breaker.consecutive_failures = 0
        breaker.ejected_until = now + min(
            self.config.base_ejection_secs * breaker.ejections, self.config.max_ejection_secs
        )
        self._open_until = max(self._open_until, breaker.ejected_until)
        return True

    def admit(self, candidates: tuple[Instance, ...]) -> tuple[Instance, ...]:
        """``candidates`` without the ejected ones; all of them if every one is ejected."""
        now = self.clock()
        if now >= self._open_until:
            return candidates
        kept = tuple(i for i in candidates if not self.is_ejected(i.url, now))
        return kept or candidates

    def is_ejected(self, url: str, now: float | None = None) -> bool:
        """Whether ``url`` is out of selection now (or at ``now``)."""
        found = self._breakers.get(url)
        return found is not None and found.is_open(self.clock() if now is None else now)

    def status(self, url: str) -> dict[str, Any]:
        """The breaker of ``url`` for ``/registered``."""
        return breaker_status(self._breakers.get(url) or Breaker(), self.clock())

    def forget(self, url: str) -> None:
        """Drop the breaker of an instance that left the registry."""
        self._breakers.pop(url, None)
