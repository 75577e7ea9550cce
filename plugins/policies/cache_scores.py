"""The cache-aware decision: FastDeploy's score, with load-first handling of cache misses.

Kept free of I/O and clocks so every branch can be tested exactly; ``cache_aware`` and
``remote_cache_aware`` differ only in where the load figures come from.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field

from fdcore.types import StrictModel

from .least_load import rotating_argmin


class CacheScoreConfig(StrictModel):
    """The scoring options of the cache-aware policies (FastDeploy's keys and defaults)."""

    balance_abs_threshold: float = Field(1.0, ge=0)
    """Loads count as imbalanced when max - min exceeds this ..."""
    balance_rel_threshold: float = Field(0.2, ge=0)
    """... and (max - min) / max exceeds this."""
    hit_ratio_weight: float = Field(1.0, ge=0)
    """Weight of the uncached share of the prompt in the score."""
    load_balance_weight: float = Field(1.0, ge=0)
    """Weight of load / max load in the score."""
    cache_threshold: float = Field(0.3, ge=0, le=1)
    """Below this best hit ratio a request is a miss and goes by load (fdcore; 0 = off)."""


class Branch(enum.StrEnum):
    """Which rule made a decision."""

    HIT = "hit"
    MISS = "miss"
    IMBALANCE = "imbalance"


@dataclass(frozen=True, slots=True)
class CandidateState:
    """What the decision sees of one candidate."""

    hit: int
    """Percent of the prompt's blocks the instance has seen (integer, as FastDeploy)."""
    load: float
    """Requests in flight (or running + waiting from the engine)."""
    tokens: int
    """Prompt tokens in flight (the router's token counter)."""
    cached_blocks: int
    """Blocks the radix tree attributes to the instance."""


def hit_percent(matched: int, total: int) -> int:
    """FastDeploy's integer hit ratio: ``matched * 100 // total`` (0 for no blocks)."""
    return matched * 100 // total if total else 0


def imbalanced(loads: Sequence[float], config: CacheScoreConfig) -> bool:
    """FastDeploy's test: both the absolute and the relative spread exceed their thresholds."""
    if len(loads) < 2:
        return False
    high, low = max(loads), min(loads)
    if high == low:
        return False
    diff = high - low
    return diff > config.balance_abs_threshold and diff / high > config.balance_rel_threshold


def choose(
    states: Sequence[CandidateState], config: CacheScoreConfig, turn: int
) -> tuple[int, Branch]:
    """Index of the chosen candidate and the branch that chose it.

    * imbalance: fewest tokens in flight (FastDeploy's ``process_tokens`` fallback); ties go
      to the lower load (which differs from the token counter when it is scraped), then the
      better hit, then take turns.
    * miss (best hit 0 or below ``cache-threshold``): fewest requests, then tokens, then the
      smallest share of the tree, then turns. Load comes first so a busy instance with a small
      tree never soaks up all cold traffic; the tree size spreads new prefixes evenly.
    * hit: lowest ``(100 - hit) / 100 * hit-ratio-weight + load / max_load *
      load-balance-weight``; ties go to fewer tokens, then take turns.
    """
    loads = [s.load for s in states]
    if imbalanced(loads, config):
        fewest_tokens = [(s.tokens, s.load, -s.hit) for s in states]
        return rotating_argmin(fewest_tokens, turn), Branch.IMBALANCE
    best = max(s.hit for s in states)
    if best == 0 or best < config.cache_threshold * 100:
        least_loaded = [(s.load, s.tokens, s.cached_blocks) for s in states]
        return rotating_argmin(least_loaded, turn), Branch.MISS
    top = max(loads)
    scores = [
        (
            (100 - s.hit) / 100 * config.hit_ratio_weight
            + (s.load / top if top > 0 else 0.0) * config.load_balance_weight,
            s.tokens,
        )
        for s in states
    ]
    return rotating_argmin(scores, turn), Branch.HIT
