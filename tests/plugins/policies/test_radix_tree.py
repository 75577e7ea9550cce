"""The radix tree against a plain model of "which instance saw which prefix, and when"."""

from __future__ import annotations

from fdcore_plugins.policies.radix_tree import RadixTree
from hypothesis import given, settings
from hypothesis import strategies as st

INSTANCES = ("a", "b", "c")
# Few distinct hash values, so random chains share prefixes and split edges often.
chains = st.lists(st.integers(0, 3), min_size=0, max_size=12)
inserts = st.lists(st.tuples(st.sampled_from(INSTANCES), chains), max_size=40)


class Model:
    """Every (instance, prefix) ever inserted, with the time it was last inserted."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, tuple[int, ...]], float] = {}

    def insert(self, chain: list[int], instance: str, now: float) -> None:
        for n in range(1, len(chain) + 1):
            self.seen[(instance, tuple(chain[:n]))] = now

    def matched(self, chain: list[int], instance: str) -> int:
        n = 0
        while n < len(chain) and (instance, tuple(chain[: n + 1])) in self.seen:
            n += 1
        return n

    def expire(self, cutoff: float) -> None:
        self.seen = {k: t for k, t in self.seen.items() if t >= cutoff}

    def blocks_of(self, instance: str) -> int:
        return sum(1 for inst, _ in self.seen if inst == instance)

    def distinct_blocks(self) -> int:
        return len({prefix for _, prefix in self.seen})


def expected(model: Model, chain: list[int], allowed: tuple[str, ...]) -> dict[str, int]:
    found = {i: model.matched(chain, i) for i in allowed}
    return {i: n for i, n in found.items() if n}


def test_match_counts_full_and_partial_edges() -> None:
    tree = RadixTree(max_blocks=100, ttl=60)
    tree.insert([1, 2, 3, 4], "a", now=0)
    tree.insert([1, 2, 9], "b", now=0)
    assert tree.match([1, 2, 3, 4, 5], ["a", "b"]) == {"a": 4, "b": 2}
    assert tree.match([1, 2, 3], ["a", "b"]) == {"a": 3, "b": 2}
    assert tree.match([1, 2, 9, 9], ["a", "b"]) == {"a": 2, "b": 3}
    assert tree.match([7], ["a", "b"]) == {}
    assert tree.match([1, 2, 3, 4], ["b"]) == {"b": 2}  # only the allowed instances
    # 4 blocks on a's chain + 1 after the split point on b's: each block stored once.
    assert tree.blocks == 5
    assert (tree.instance_blocks("a"), tree.instance_blocks("b")) == (4, 3)


@given(inserts, chains)
def test_match_agrees_with_model(ops: list[tuple[str, list[int]]], probe: list[int]) -> None:
    tree, model = RadixTree(max_blocks=10_000, ttl=1e9), Model()
    for now, (instance, chain) in enumerate(ops):
        tree.insert(chain, instance, now)
        model.insert(chain, instance, now)
    assert tree.match(probe, INSTANCES) == expected(model, probe, INSTANCES)
    for instance in INSTANCES:
        assert tree.instance_blocks(instance) == model.blocks_of(instance)
    assert tree.blocks == model.distinct_blocks()
    assert tree.node_count <= tree.blocks


@given(inserts, st.integers(1, 15))
def test_capacity_bounds_memory(ops: list[tuple[str, list[int]]], cap: int) -> None:
    tree, model = RadixTree(max_blocks=cap, ttl=1e9), Model()
    for now, (instance, chain) in enumerate(ops):
        tree.insert(chain, instance, now)
        model.insert(chain, instance, now)
        assert tree.blocks <= cap
        assert tree.node_count <= tree.blocks
        # The chain just inserted is the most recent entry: it survives eviction.
        assert tree.match(chain, [instance]).get(instance, 0) == min(len(chain), cap)
        for probe_instance in INSTANCES:  # eviction may forget, never invent
            got = tree.match(chain, [probe_instance]).get(probe_instance, 0)
            assert got <= model.matched(chain, probe_instance)
            assert tree.instance_blocks(probe_instance) <= model.blocks_of(probe_instance)


@settings(deadline=None)
@given(inserts, st.integers(0, 45), chains)
def test_expiry_removes_exactly_the_stale_entries(
    ops: list[tuple[str, list[int]]], now: int, probe: list[int]
) -> None:
    ttl = 10
    tree, model = RadixTree(max_blocks=10_000, ttl=ttl), Model()
    for t, (instance, chain) in enumerate(ops):
        tree.insert(chain, instance, t)
        model.insert(chain, instance, t)
    tree.evict_expired(now)
    model.expire(now - ttl)
    assert tree.match(probe, INSTANCES) == expected(model, probe, INSTANCES)
    assert tree.blocks == model.distinct_blocks()
    for instance in INSTANCES:
        assert tree.instance_blocks(instance) == model.blocks_of(instance)


def test_everything_expires_eventually() -> None:
    tree = RadixTree(max_blocks=100, ttl=5)
    tree.insert([1, 2, 3], "a", now=0)
    tree.insert([1, 4], "b", now=3)
    assert tree.evict_expired(now=7) == 2  # a's [2, 3] went; b refreshed the shared [1]
    assert tree.match([1, 2, 3], ["a", "b"]) == {"b": 1}
    assert tree.evict_expired(now=100) == 2
    assert (tree.blocks, tree.node_count) == (0, 0)


@given(inserts, st.sampled_from(INSTANCES), chains)
def test_remove_instance(ops: list[tuple[str, list[int]]], gone: str, probe: list[int]) -> None:
    tree, model = RadixTree(max_blocks=10_000, ttl=1e9), Model()
    for now, (instance, chain) in enumerate(ops):
        tree.insert(chain, instance, now)
        model.insert(chain, instance, now)
    tree.remove_instance(gone)
    model.seen = {k: t for k, t in model.seen.items() if k[0] != gone}
    assert tree.match(probe, INSTANCES) == expected(model, probe, INSTANCES)
    assert tree.instance_blocks(gone) == 0
    assert tree.blocks == model.distinct_blocks()
