"""The cache-aware decision: bounded-load cache affinity, or FastDeploy's score.

Kept free of I/O and clocks so every branch can be tested exactly; ``cache_aware`` and
``remote_cache_aware`` differ only in where the load figures come from.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field, field_validator

from fdcore.types import StrictModel

from .least_load import rotating_argmin


class CacheScoreConfig(StrictModel):
    """The decision's options: FastDeploy's keys and defaults, plus fdcore's."""

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
    load_factor: float = Field(2.0, ge=0)
    """fdcore: an instance takes affinity traffic only while its load stays within this
    multiple of the mean (bounded-load affinity); 0 = FastDeploy's score and imbalance rule."""

    @field_validator("load_factor")
    @classmethod
    def _off_or_at_least_one(cls, value: float) -> float:
        # Below 1 the bound can sit under every instance's load and nothing would be eligible.
        if 0 < value < 1:
            raise ValueError("load-factor must be 0 (off) or at least 1")
        return value


class Branch(enum.StrEnum):
    """Which rule made a decision."""

    HIT = "hit"
    MISS = "miss"
    IMBALANCE = "imbalance"
    SPILL = "spill"


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


def load_bound(loads: Sequence[float], load_factor: float) -> int:
    """Most load an instance may reach by taking the next request under bounded affinity.

    ``ceil(load_factor * (total + 1) / candidates)``: the mean load once the request is
    placed, stretched by the factor. With a factor of at least 1 and whole-number loads some
    candidate is always within it, since not all of them can exceed the mean.
    """
    return math.ceil(load_factor * (sum(loads) + 1) / len(loads))


def choose(
    states: Sequence[CandidateState], config: CacheScoreConfig, turn: int
) -> tuple[int, Branch]:
    """Index of the chosen candidate and the branch that chose it.

    ``load-factor`` > 0 decides by :func:`choose_bounded`, 0 by :func:`choose_scored`.
    """
    if config.load_factor > 0:
        return choose_bounded(states, config, turn)
    return choose_scored(states, config, turn)


def choose_bounded(
    states: Sequence[CandidateState], config: CacheScoreConfig, turn: int
) -> tuple[int, Branch]:
    """Bounded-load cache affinity ("consistent hashing with bounded loads").

    Only candidates whose load plus this request stays within :func:`load_bound` are
    eligible. Among them the best hit wins; ties go to the lower load, then fewer tokens,
    then take turns. If no eligible candidate's hit reaches ``cache-threshold`` the request
    is a miss and goes to the least-loaded eligible candidate (as in :func:`choose_scored`).

    A session thus stays on the instance holding its history until that instance carries
    more than its share, and a hot prefix spreads to further instances instead of queueing
    on one. The branch is ``spill`` when a candidate with a better (useful) hit was over
    the bound.
    """
    limit = load_bound([s.load for s in states], config.load_factor)
    eligible = [i for i, s in enumerate(states) if s.load + 1 <= limit]
    if not eligible:
        # Only fractional (scraped) loads can leave no one within the bound: take the lightest.
        lightest = min(s.load for s in states)
        eligible = [i for i, s in enumerate(states) if s.load == lightest]
    floor = max(1.0, config.cache_threshold * 100)
    best = max(states[i].hit for i in eligible)
    keys: list[tuple[float, ...]]
    if best < floor:
        keys = [(states[i].load, states[i].tokens, states[i].cached_blocks) for i in eligible]
        branch = Branch.MISS
    else:
        keys = [(-states[i].hit, states[i].load, states[i].tokens) for i in eligible]
        branch = Branch.HIT
    chosen = eligible[rotating_argmin(keys, turn)]
    passed_over = max(s.hit for s in states)
    if passed_over >= floor and passed_over > states[chosen].hit:
        branch = Branch.SPILL
    return chosen, branch


def choose_scored(
    states: Sequence[CandidateState], config: CacheScoreConfig, turn: int
) -> tuple[int, Branch]:
    """FastDeploy's decision, with fdcore's miss rule and turn-taking.

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
