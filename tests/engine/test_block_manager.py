"""Block manager and prefix cache: invariants under random operation sequences, and sharing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdcore.engine.block_manager import BlockManager, BlockTable, OutOfBlocks

BLOCK = 4


def check_invariants(bm: BlockManager, tables: list[tuple[BlockTable, list[int]]]) -> None:
    held: dict[int, int] = {}
    for table, _ in tables:
        for block in table.blocks:
            held[block] = held.get(block, 0) + 1
    for block in range(bm.num_blocks):
        assert bm.refcount(block) >= 0
        assert bm.refcount(block) == held.get(block, 0)
    assert bm.num_used == len(held)
    assert bm.num_free + bm.cache.num_evictable + bm.num_used == bm.num_blocks


# A small alphabet and short prompts make shared prefixes common.
prompts = st.lists(st.integers(0, 2), min_size=1, max_size=6 * BLOCK)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), prompts),
        st.tuples(st.just("grow"), st.integers(0, 20), st.integers(1, 3 * BLOCK)),
        st.tuples(st.just("free"), st.integers(0, 20)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, caching=st.booleans())
def test_invariants_hold_under_any_operations(ops: list[tuple], caching: bool) -> None:
    bm = BlockManager(num_blocks=12, block_size=BLOCK, enable_prefix_caching=caching)
    live: list[tuple[BlockTable, list[int]]] = []
    for op in ops:
        if op[0] == "alloc":
            table, tokens = BlockTable(), list(op[1])
            before = bm.num_available
            try:
                cached = bm.allocate_prompt(table, tokens)
            except OutOfBlocks:
                assert bm.num_available == before and not table.blocks
            else:
                assert cached % BLOCK == 0 and cached < len(tokens)
                assert len(table.blocks) == bm.blocks_for(len(tokens))
                # The sequence is computed in full, so its full blocks enter the cache.
                bm.commit(table, tokens, len(tokens))
                live.append((table, tokens))
        elif op[0] == "grow" and live:
            table, tokens = live[op[1] % len(live)]
            extra = [7] * op[2]
            if bm.grow(table, len(tokens) + len(extra)):
                tokens.extend(extra)
                bm.commit(table, tokens, len(tokens))
        elif op[0] == "free" and live:
            table, _ = live.pop(op[1] % len(live))
            bm.free(table)
            assert not table.blocks
        check_invariants(bm, live)
    for table, _ in live:
        bm.free(table)
    check_invariants(bm, [])
    assert bm.num_available == bm.num_blocks


@settings(max_examples=100, deadline=None)
@given(prefix_blocks=st.integers(1, 4), tail_a=prompts, tail_b=prompts)
def test_shared_prefix_is_shared(prefix_blocks: int, tail_a: list[int], tail_b: list[int]) -> None:
    bm = BlockManager(num_blocks=64, block_size=BLOCK)
    prefix = [9] * (prefix_blocks * BLOCK)
    a, b = BlockTable(), BlockTable()
    # The block after the prefix differs in its first token, so exactly the prefix is shared.
    tokens_a, tokens_b = [*prefix, 0, *tail_a], [*prefix, 1, *tail_b]
    assert bm.allocate_prompt(a, tokens_a) == 0
    bm.commit(a, tokens_a, len(tokens_a))
    cached = bm.allocate_prompt(b, tokens_b)
    assert cached == prefix_blocks * BLOCK
    assert a.blocks[:prefix_blocks] == b.blocks[:prefix_blocks]
    assert all(bm.refcount(block) == 2 for block in a.blocks[:prefix_blocks])


def test_whole_prompt_cached_still_feeds_the_last_token() -> None:
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    tokens = list(range(2 * BLOCK))
    first = BlockTable()
    bm.allocate_prompt(first, tokens)
    bm.commit(first, tokens, len(tokens))
    bm.free(first)
    second = BlockTable()
    assert bm.allocate_prompt(second, tokens) == BLOCK


def test_unreferenced_cached_blocks_are_reused_least_recently_used_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    old, new = BlockTable(), BlockTable()
    old_tokens, new_tokens = [1] * (2 * BLOCK), [2] * (2 * BLOCK)
    for table, tokens in ((old, old_tokens), (new, new_tokens)):
        bm.allocate_prompt(table, tokens)
        bm.commit(table, tokens, len(tokens))
        bm.free(table)
    assert bm.num_free == 0 and bm.cache.num_evictable == 4
    taker = BlockTable()
    bm.allocate_prompt(taker, [3] * BLOCK)  # evicts one block of the older prompt
    probe = BlockTable()
    assert bm.allocate_prompt(probe, [*new_tokens, 0]) == 2 * BLOCK
    bm.free(probe)
    assert bm.allocate_prompt(probe, [*old_tokens, 0]) < 2 * BLOCK


def test_allocation_beyond_capacity_takes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=BLOCK)
    with pytest.raises(OutOfBlocks):
        bm.allocate_prompt(BlockTable(), [1] * (3 * BLOCK))
    assert bm.num_available == 2
