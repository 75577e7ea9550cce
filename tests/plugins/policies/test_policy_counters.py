"""Every policy under random select / count-in / release sequences from a simulated router."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdcore.types import Outcome
from tests.plugins.policies.policy_helpers import (
    ALL_POLICIES,
    Sent,
    SimRouter,
    build_policy,
    make_instances,
)

PROMPTS = ("", "short", "You are terse. " * 10, "You are terse. " * 10 + "Why?", "x" * 200)

ops = st.lists(
    st.one_of(
        # send a prompt to a non-empty subset of the instances (the healthy ones)
        st.tuples(st.just("send"), st.sampled_from(PROMPTS), st.integers(1, 15)),
        # finish the k-th request in flight, however it ended
        st.tuples(st.just("finish"), st.integers(0, 50), st.sampled_from(list(Outcome))),
        # an instance leaves the registry (and comes back later)
        st.tuples(st.just("forget"), st.integers(0, 3)),
    ),
    max_size=60,
)


@pytest.mark.parametrize("name", ALL_POLICIES)
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(steps=ops)
async def test_counters_balance_and_choices_stay_among_candidates(
    name: str, steps: list[Any]
) -> None:
    instances = make_instances(4)
    policy = build_policy(name, instances, {"max-tree-blocks": 8} if "cache" in name else {})
    router = SimRouter(policy, instances)
    in_flight: list[Sent] = []
    for step in steps:
        if step[0] == "send":
            _, prompt, mask = step
            candidates = [i for n, i in enumerate(instances) if mask >> n & 1]
            in_flight.append(await router.send(prompt, candidates))
        elif step[0] == "finish" and in_flight:
            router.finish(in_flight.pop(step[1] % len(in_flight)), step[2])
        elif step[0] == "forget":
            policy.forget(instances[step[1]])
        if "cache" in name:
            assert policy.tree.blocks <= 8
    for sent in in_flight:
        router.finish(sent)
    assert all(i.load.requests == 0 and i.load.tokens == 0 for i in instances)
    if hasattr(policy, "in_flight_credit"):
        assert policy.in_flight_credit() == 0
        assert policy._credit == {}
