"""cache_aware: FastDeploy's scoring, memory bounds, tokenizer fallback and no hot-spotting."""

from __future__ import annotations

import random
import time
from collections import deque
from typing import Any

import pytest
from aiohttp import web
from fdcore_plugins.policies.cache_scores import (
    Branch,
    CacheScoreConfig,
    CandidateState,
    choose,
    hit_percent,
)
from prometheus_client import CollectorRegistry

from fdcore.types import Role
from tests.plugins.policies.policy_helpers import (
    LoopbackServer,
    Sent,
    SimRouter,
    build_policy,
    make_instances,
    sample_value,
)

FASTDEPLOY = CacheScoreConfig(load_factor=0)  # the score path, as before load-factor


def states(*rows: tuple[int, float, int, int]) -> list[CandidateState]:
    return [CandidateState(*row) for row in rows]


# ------------------------------------------------------------------------------------------
# The decision, branch by branch (hit %, load, tokens, cached blocks).


def test_hit_branch_is_fastdeploys_score() -> None:
    # (100-0)/100 + 1/1 = 2.0 against (100-50)/100 + 1/1 = 1.5.
    assert choose(states((0, 1, 0, 0), (50, 1, 0, 0)), FASTDEPLOY, 0) == (1, Branch.HIT)
    # 0.2 + 2/2 = 1.2 against 1.0 + 1/2 = 1.5: the cached instance wins despite more load ...
    assert choose(states((80, 2, 0, 0), (0, 1, 0, 0)), FASTDEPLOY, 0) == (0, Branch.HIT)
    # ... until load weighs more: 0.2 + 2 = 2.2 against 1.0 + 1 = 2.0.
    heavy = CacheScoreConfig(load_balance_weight=2, load_factor=0)
    assert choose(states((80, 2, 0, 0), (0, 1, 0, 0)), heavy, 0) == (1, Branch.HIT)


def test_equal_scores_go_to_fewer_tokens_then_take_turns() -> None:
    rows = states((50, 0, 30, 0), (50, 0, 10, 0), (50, 0, 10, 0))
    assert [choose(rows, FASTDEPLOY, turn)[0] for turn in range(4)] == [1, 2, 1, 2]


def test_imbalance_falls_back_to_fewest_tokens() -> None:
    # max - min = 5 > 1 and 5/5 > 0.2: process_tokens, whatever the cache says.
    rows = states((100, 5, 10, 0), (0, 0, 50, 0), (0, 3, 0, 0))
    assert choose(rows, FASTDEPLOY, 0) == (2, Branch.IMBALANCE)
    # Equal tokens: the lower load, then the better hit.
    rows = states((0, 5, 0, 0), (0, 0, 0, 0), (90, 0, 0, 0))
    assert choose(rows, FASTDEPLOY, 0) == (2, Branch.IMBALANCE)
    # A spread of exactly the absolute threshold is not an imbalance.
    assert choose(states((100, 2, 9, 0), (0, 1, 0, 0)), FASTDEPLOY, 0) == (0, Branch.HIT)


def test_cold_misses_take_turns_instead_of_piling_onto_the_first_url() -> None:
    rows = states((0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0))
    assert [choose(rows, FASTDEPLOY, turn)[0] for turn in range(6)] == [0, 1, 2, 0, 1, 2]


def test_a_miss_goes_by_load_before_tree_size() -> None:
    # The death spiral: a busy instance with a small tree must not soak up every miss.
    wide = CacheScoreConfig(balance_abs_threshold=100, load_factor=0)
    rows = states((0, 8, 0, 0), (0, 7, 0, 5000))
    assert choose(rows, wide, 0) == (1, Branch.MISS)
    # At equal load the smaller tree takes the new prefix.
    assert choose(states((0, 2, 0, 300), (0, 2, 0, 100)), wide, 0) == (1, Branch.MISS)


def test_weak_hits_below_the_threshold_are_misses() -> None:
    rows = states((20, 0, 0, 100), (0, 0, 0, 0))
    assert choose(rows, FASTDEPLOY, 0) == (1, Branch.MISS)
    assert choose(rows, CacheScoreConfig(cache_threshold=0, load_factor=0), 0) == (0, Branch.HIT)


def test_hit_percent_is_an_integer_like_fastdeploys() -> None:
    assert hit_percent(2, 3) == 66
    assert hit_percent(0, 0) == 0


# ------------------------------------------------------------------------------------------
# The policy over a simulated router.

SHARED = "You are a support agent for an online bookshop. " * 14  # 686 chars: 10 full blocks

# Both decisions: bounded affinity (the default) and FastDeploy's score (load-factor 0).
MODES = pytest.mark.parametrize("config", [{}, {"load-factor": 0}], ids=["bounded", "scored"])


def unique_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(length))


@MODES
async def test_the_same_prompt_sticks_to_one_instance(config: dict[str, Any]) -> None:
    instances = make_instances(3)
    router = SimRouter(build_policy("cache_aware", instances, config), instances)
    for _ in range(5):
        router.finish(await router.send(SHARED))
    assert router.chosen == {instances[0].url: 5}


@MODES
async def test_a_cached_prefix_beats_url_order(config: dict[str, Any]) -> None:
    instances = make_instances(3)
    router = SimRouter(build_policy("cache_aware", instances, config), instances)
    router.finish(await router.send(SHARED + "first question", candidates=[instances[2]]))
    sent = await router.send(SHARED + "second question")
    assert sent.instance is instances[2]


@MODES
async def test_unique_prompts_spread_evenly_at_low_concurrency(config: dict[str, Any]) -> None:
    instances = make_instances(4)
    router = SimRouter(build_policy("cache_aware", instances, config), instances)
    rng = random.Random(1)
    for _ in range(40):
        router.finish(await router.send(unique_text(rng, 300)))
    assert sorted(router.chosen.values()) == [10, 10, 10, 10]


async def skewed_run(
    concurrency: int, config: dict[str, Any], total: int = 400
) -> tuple[SimRouter, dict[str, int]]:
    """90% of prompts share SHARED; keep ``concurrency`` requests in flight (FIFO)."""
    instances = make_instances(4)
    router = SimRouter(build_policy("cache_aware", instances, config), instances)
    rng = random.Random(7)
    in_flight: deque[Sent] = deque()
    shared_to: dict[str, int] = {}
    for _ in range(total):
        if rng.random() < 0.9:
            sent = await router.send(SHARED + unique_text(rng, 120))
            shared_to[sent.instance.url] = shared_to.get(sent.instance.url, 0) + 1
        else:
            sent = await router.send(unique_text(rng, 800))
        in_flight.append(sent)
        if len(in_flight) >= concurrency:
            router.finish(in_flight.popleft())
    while in_flight:
        router.finish(in_flight.popleft())
    assert all(i.load.requests == 0 and i.load.tokens == 0 for i in instances)
    return router, shared_to


@MODES
async def test_skewed_prefixes_do_not_hot_spot_under_load(config: dict[str, Any]) -> None:
    router, _ = await skewed_run(8, config)
    assert len(router.chosen) == 4, "every instance receives work"
    assert max(router.chosen.values()) < 0.5 * router.sent, router.chosen


@MODES
async def test_skewed_prefixes_stay_together_when_load_allows(config: dict[str, Any]) -> None:
    router, shared_to = await skewed_run(1, config)
    assert len(router.chosen) == 4, "the unrelated prompts go to the other instances"
    assert max(shared_to.values()) >= 0.9 * sum(shared_to.values()), shared_to


# ------------------------------------------------------------------------------------------
# Memory, expiry, forgetting, metrics.


async def test_tree_stays_within_max_tree_blocks() -> None:
    instances = make_instances(2)
    policy = build_policy("cache_aware", instances, {"max-tree-blocks": 50})
    router = SimRouter(policy, instances)
    rng = random.Random(3)
    for _ in range(60):
        router.finish(await router.send(unique_text(rng, 64 * 7)))
        assert policy.tree.blocks <= 50


async def test_entries_expire_after_eviction_duration() -> None:
    instances = make_instances(2)
    registry = CollectorRegistry()
    policy = build_policy("cache_aware", instances, {"eviction-duration-mins": 1}, registry)
    router = SimRouter(policy, instances)
    router.finish(await router.send(SHARED))
    assert policy.tree.blocks == 10
    assert policy.evict(now=time.monotonic() + 30) == 0
    assert policy.evict(now=time.monotonic() + 61) == 10
    assert sample_value(registry, "fdcore_policy_radix_tree_blocks",
                        policy="cache_aware", role="mixed") == 0


async def test_forget_drops_the_instance_from_the_tree() -> None:
    instances = make_instances(2)
    policy = build_policy("cache_aware", instances)
    router = SimRouter(policy, instances)
    router.finish(await router.send(SHARED))
    policy.forget(instances[0])
    assert policy.tree.instance_blocks(instances[0].url) == 0
    assert policy.tree.blocks == 0


async def test_decisions_are_counted_by_branch_in_a_shared_registry() -> None:
    registry = CollectorRegistry()
    prefill = make_instances(2, Role.PREFILL)
    decode = make_instances(2, Role.DECODE)
    p_policy = build_policy("cache_aware", prefill, prometheus=registry, role=Role.PREFILL)
    d_policy = build_policy("remote_cache_aware", decode, prometheus=registry, role=Role.DECODE)
    p_router, d_router = SimRouter(p_policy, prefill), SimRouter(d_policy, decode)
    for _ in range(3):
        p_router.finish(await p_router.send(SHARED))
    d_router.finish(await d_router.send(SHARED))

    def count(policy: str, role: str, branch: str) -> float:
        return sample_value(registry, "fdcore_policy_cache_aware_decisions_total",
                            policy=policy, role=role, branch=branch)

    assert count("cache_aware", "prefill", "miss") == 1
    assert count("cache_aware", "prefill", "hit") == 2
    assert count("remote_cache_aware", "decode", "miss") == 1


async def test_start_and_stop_run_the_background_sweep() -> None:
    policy = build_policy("cache_aware", make_instances(1))
    await policy.start()
    await policy.stop()


# ------------------------------------------------------------------------------------------
# tokenizer-url against a real loopback server.


async def word_length_ids(req: web.Request) -> web.StreamResponse:
    """A toy tokenizer: one id per word, the word's length."""
    body = await req.json()
    assert body["text"] == body["prompt"] == body["message"]
    return web.json_response({"input_ids": [len(w) for w in body["text"].split()]})


async def no_ids(req: web.Request) -> web.StreamResponse:
    return web.json_response({"tokens": []})


async def test_tokenizer_ids_are_hashed(servers: Any) -> None:
    server = await servers(LoopbackServer("/tokenize", "POST", word_length_ids))
    instances = make_instances(2)
    policy = build_policy("cache_aware", instances, {
        "tokenizer-url": f"http://127.0.0.1:{server.port}",  # /tokenize is implied
        "cache-block-size": 4,
    })
    await policy.start()
    try:
        router = SimRouter(policy, instances)
        first = await router.send("aaa bbb ccc ddd eee")
        router.finish(first)
        # Different characters, same ids: a hit only a tokenizer can see.
        second = await router.send("xxx yyy zzz www vvv")
        router.finish(second)
    finally:
        await policy.stop()
    assert second.instance is first.instance
    assert server.hits == 2


@pytest.mark.parametrize(("mode", "respond", "reason"), [
    ("error", word_length_ids, "error"),
    ("hang", word_length_ids, "timeout"),
    ("ok", no_ids, "invalid"),
])
async def test_tokenizer_failure_falls_back_to_characters(
    servers: Any, mode: str, respond: Any, reason: str
) -> None:
    server = await servers(LoopbackServer("/tokenize", "POST", respond))
    server.mode = mode
    registry = CollectorRegistry()
    instances = make_instances(2)
    policy = build_policy("cache_aware", instances, {
        "tokenizer-url": f"http://127.0.0.1:{server.port}/tokenize",
        "tokenizer-timeout-secs": 0.2,
    }, registry)
    await policy.start()
    try:
        router = SimRouter(policy, instances)
        first = await router.send(SHARED)
        router.finish(first)
        second = await router.send(SHARED)
        router.finish(second)
    finally:
        await policy.stop()
    assert second.instance is first.instance  # character blocks still match
    assert policy.tree.blocks == 10
    assert sample_value(registry, "fdcore_policy_tokenizer_fallback_total",
                        policy="cache_aware", role="mixed", reason=reason) == 2
