"""cache_aware's bounded-load affinity (``load-factor``): the bound, spill-over, stickiness."""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import pytest
from fdcore_plugins.policies.cache_scores import (
    Branch,
    CacheScoreConfig,
    CandidateState,
    choose,
    load_bound,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fdcore.types import Instance
from tests.plugins.policies.policy_helpers import Sent, SimRouter, build_policy, make_instances

BOUNDED = CacheScoreConfig(load_factor=1.25)
FACTOR = {"load-factor": 1.25}  # the bound_5_4 below


def states(*rows: tuple[int, float, int, int]) -> list[CandidateState]:
    return [CandidateState(*row) for row in rows]


def bound_5_4(loads: list[int]) -> int:
    """The bound for load-factor 1.25, in integers: ceil(5 (total + 1) / (4 n))."""
    return -(-5 * (sum(loads) + 1) // (4 * len(loads)))


# ------------------------------------------------------------------------------------------
# The decision (hit %, load, tokens, cached blocks).


def test_the_bound_is_the_stretched_mean_after_placing_the_request() -> None:
    assert load_bound([0, 0, 0, 0], 1.25) == 1
    assert load_bound([4, 4, 4, 3], 1.25) == 5
    assert load_bound([10, 0], 1.0) == 6


def test_the_best_hit_within_the_bound_wins_whatever_the_load_spread() -> None:
    # Loads 5/4/4/3 are an imbalance to FastDeploy's rule, which leaves the cached instance;
    # the bound (ceil(1.25 * 17 / 4) = 6) still has room for it ...
    rows = states((90, 5, 0, 0), (0, 4, 0, 0), (0, 4, 0, 0), (0, 3, 0, 0))
    assert choose(rows, BOUNDED, 0) == (0, Branch.HIT)
    assert choose(rows, CacheScoreConfig(load_factor=0), 0) == (3, Branch.IMBALANCE)
    # ... but not at 3 of 3 in flight on two instances (ceil(1.25 * 4 / 2) = 3).
    assert choose(states((90, 3, 0, 0), (10, 0, 0, 0)), BOUNDED, 0) == (1, Branch.SPILL)


def test_equal_hits_go_to_lower_load_then_fewer_tokens_then_turns() -> None:
    rows = states((60, 2, 0, 0), (60, 1, 50, 0), (60, 1, 10, 0), (20, 0, 0, 0))
    assert choose(rows, BOUNDED, 0) == (2, Branch.HIT)
    rows = states((60, 1, 10, 0), (60, 1, 10, 0), (0, 1, 10, 0))
    assert [choose(rows, BOUNDED, turn)[0] for turn in range(4)] == [0, 1, 0, 1]


def test_a_miss_goes_to_the_least_loaded_then_the_smallest_tree() -> None:
    rows = states((0, 2, 0, 0), (0, 1, 0, 900), (20, 1, 0, 100))  # 20% < cache-threshold
    assert choose(rows, BOUNDED, 0) == (2, Branch.MISS)
    assert choose(states((0, 0, 0, 0), (0, 0, 0, 0)), BOUNDED, 1) == (1, Branch.MISS)


def test_a_hot_prefix_spills_to_an_instance_without_it() -> None:
    # The only holder is at the bound (ceil(1.25 * 5 / 3) = 3): least loaded of the rest.
    rows = states((95, 3, 0, 0), (0, 1, 0, 0), (0, 0, 0, 0))
    assert choose(rows, BOUNDED, 0) == (2, Branch.SPILL)


@pytest.mark.parametrize("factor", [0.5, 0.99, -1])
def test_load_factor_is_off_or_at_least_one(factor: float) -> None:
    with pytest.raises(ValidationError):
        CacheScoreConfig.model_validate({"load-factor": factor})
    assert CacheScoreConfig.model_validate({"load-factor": 0}).load_factor == 0
    assert CacheScoreConfig.model_validate({"load-factor": 1}).load_factor == 1


candidate_states = st.lists(
    st.builds(
        CandidateState,
        hit=st.integers(0, 100),
        load=st.one_of(st.integers(0, 20), st.floats(0, 20)),  # scraped loads may be fractional
        tokens=st.integers(0, 10_000),
        cached_blocks=st.integers(0, 100),
    ),
    min_size=1,
    max_size=8,
)


@given(candidate_states, st.floats(1, 4), st.integers(0, 100))
def test_the_choice_is_always_within_the_bound(
    rows: list[CandidateState], factor: float, turn: int
) -> None:
    config = CacheScoreConfig(load_factor=factor)
    index, _ = choose(rows, config, turn)
    bound = load_bound([r.load for r in rows], factor)
    if any(r.load + 1 <= bound for r in rows):
        assert rows[index].load + 1 <= bound
    else:  # fractional scraped loads can put everyone over: the lightest takes it
        assert rows[index].load == min(r.load for r in rows)


# ------------------------------------------------------------------------------------------
# The policy over a simulated router.

SYSTEMS = [f"[system {g}] " + "You answer questions about orders. " * 12 for g in range(3)]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 2), st.integers(0, 5)),
        st.tuples(st.just("finish"), st.integers(0, 40)),
    ),
    max_size=80,
)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(steps=ops, count=st.integers(1, 5))
async def test_no_selection_exceeds_the_bound(steps: list[Any], count: int) -> None:
    instances = make_instances(count)
    router = SimRouter(build_policy("cache_aware", instances, FACTOR), instances)
    in_flight: list[Sent] = []
    for step in steps:
        if step[0] == "send":
            limit = bound_5_4([i.load.requests for i in instances])
            sent = await router.send(SYSTEMS[step[1]] + f"question {step[2]}")
            assert sent.instance.load.requests <= limit
            in_flight.append(sent)
        elif in_flight:
            router.finish(in_flight.pop(step[1] % len(in_flight)))


async def test_a_skewed_mix_spreads_over_every_instance_within_the_bound() -> None:
    """70% of the traffic on one system prompt, 16 requests in flight, 4 instances."""
    instances = make_instances(4)
    router = SimRouter(build_policy("cache_aware", instances, FACTOR), instances)
    rng = random.Random(5)
    in_flight: deque[Sent] = deque()
    for n in range(600):
        system = SYSTEMS[0] if rng.random() < 0.7 else SYSTEMS[1 + n % 2]
        limit = bound_5_4([i.load.requests for i in instances])
        sent = await router.send(system + f"request {n}: " + "x" * rng.randrange(300))
        assert sent.instance.load.requests <= limit
        in_flight.append(sent)
        if len(in_flight) >= 16:
            router.finish(in_flight.popleft())
    assert len(router.chosen) == 4, "every instance receives work"
    # 16 in flight never lets one instance hold more than 5 of them: at most 5/16 of the work.
    assert max(router.chosen.values()) <= 5 / 16 * router.sent + 5, router.chosen


async def test_sessions_stay_on_their_instance_while_it_is_within_the_bound() -> None:
    """Interleaved chat sessions whose history grows each turn, 6 in flight on 3 instances."""
    instances = make_instances(3)
    router = SimRouter(build_policy("cache_aware", instances, FACTOR), instances)
    rng = random.Random(11)
    history = {s: SYSTEMS[s % 3 if s % 2 else 0] + f"[session {s}]" for s in range(24)}
    home: dict[int, Instance] = {}
    stayed = moved = 0
    in_flight: deque[tuple[int, Sent]] = deque()
    for _ in range(400):
        busy = {s for s, _ in in_flight}
        session = rng.choice([s for s in history if s not in busy])
        history[session] += " turn: " + "".join(rng.choice("abcdef ") for _ in range(120))
        previous = home.get(session)
        eligible = previous is not None and previous.load.requests + 1 <= bound_5_4(
            [i.load.requests for i in instances]
        )
        sent = await router.send(history[session])
        if eligible:
            assert sent.instance is previous, f"session {session} left an instance with room"
            stayed += 1
        elif previous is not None:
            moved += sent.instance is not previous
        home[session] = sent.instance
        in_flight.append((session, sent))
        if len(in_flight) >= 6:
            router.finish(in_flight.popleft()[1])
    assert stayed > 5 * moved, (stayed, moved)


async def test_one_session_at_a_time_never_moves() -> None:
    instances = make_instances(4)
    router = SimRouter(build_policy("cache_aware", instances, FACTOR), instances)
    prompt = SYSTEMS[0]
    for turn in range(10):
        prompt += f" turn {turn}: " + "y" * 100
        router.finish(await router.send(prompt))
    assert list(router.chosen.values()) == [10]
