"""The counter policies: power_of_two, process_tokens, request_num, fd_metrics_score."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from fdcore.types import Instance, SelectionPolicy
from tests.plugins.policies.policy_helpers import (
    ALL_POLICIES,
    build_policy,
    make_instances,
    request,
)

loads = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 500)), min_size=1, max_size=8)


def with_loads(pairs: list[tuple[int, int]]) -> list[Instance]:
    instances = make_instances(len(pairs))
    for instance, (requests, tokens) in zip(instances, pairs, strict=True):
        instance.load.requests, instance.load.tokens = requests, tokens
    return instances


def first_argmin(values: Sequence[float]) -> int:
    return min(range(len(values)), key=lambda i: (values[i], i))


@pytest.mark.parametrize(
    ("name", "counter"),
    [
        ("process_tokens", lambda i: i.load.tokens),
        ("request_num", lambda i: i.load.requests),
        ("fd_metrics_score", lambda i: i.load.requests),
    ],
)
@given(pairs=loads)
async def test_argmin_policies_are_deterministic(name: str, counter: Any, pairs: Any) -> None:
    instances = with_loads(pairs)
    policy = build_policy(name, instances)
    chosen = await policy.select(request("hello"), instances)
    assert chosen is instances[first_argmin([counter(i) for i in instances])]


@pytest.mark.parametrize("name", ["process_tokens", "request_num", "fd_metrics_score"])
async def test_argmin_ties_take_turns(name: str) -> None:
    # All idle (sequential traffic): FastDeploy would send everything to the first url.
    instances = with_loads([(0, 0), (0, 0), (0, 0)])
    policy = build_policy(name, instances)
    chosen = [await policy.select(request("hello"), instances) for _ in range(6)]
    assert chosen == instances * 2
    # A strictly lower load still wins outright.
    instances[1].load.requests = instances[1].load.tokens = 5
    instances[2].load.requests = instances[2].load.tokens = 5
    assert {id(await policy.select(request("x"), instances)) for _ in range(3)} == {
        id(instances[0])
    }


def test_fd_metrics_score_takes_waiting_weight() -> None:
    policy = build_policy("fd_metrics_score", make_instances(1), {"waiting-weight": 10})
    assert policy.config.waiting_weight == 10
    with pytest.raises(ValidationError):
        build_policy("fd_metrics_score", make_instances(1), {"waiting-weight": -1})


class RecordingRandom(random.Random):
    """Remembers the index pairs power_of_two samples."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.pairs: list[list[int]] = []

    def sample(self, population: Any, k: int, **kwargs: Any) -> list[Any]:
        picked = super().sample(population, k, **kwargs)
        self.pairs.append(picked)
        return picked


@given(pairs=loads, seed=st.integers(0, 2**32))
async def test_power_of_two_keeps_the_lower_of_its_two(pairs: Any, seed: int) -> None:
    instances = with_loads(pairs)
    policy = build_policy("power_of_two", instances)
    policy.rng = RecordingRandom(seed)
    chosen = await policy.select(request(), instances)
    if len(instances) == 1:
        assert chosen is instances[0]
        return
    (i, j) = policy.rng.pairs[-1]
    assert i != j
    first, second = instances[i], instances[j]
    expected = second if second.load.requests < first.load.requests else first
    assert chosen is expected


async def test_power_of_two_with_two_candidates_always_takes_the_idle_one() -> None:
    instances = with_loads([(3, 0), (1, 0)])
    policy = build_policy("power_of_two", instances)
    picks = {(await policy.select(request(), instances)).url for _ in range(50)}
    assert picks == {instances[1].url}


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_every_policy_is_registered_with_a_strict_config(name: str) -> None:
    policy: SelectionPolicy = build_policy(name, make_instances(2))
    assert isinstance(policy, SelectionPolicy)
    assert policy.name == name
    with pytest.raises(ValidationError):
        build_policy(name, make_instances(2), {"no-such-key": 1})
