"""The sim pool's read-back: a consistent pool gives exactly the rolling hash however its blocks
got there, and any single altered bit, zeroed block or swapped block changes the hash."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fdcore.engine.runner import SeqInput
from fdcore.engine.runners.sim.pool import BYTES_PER_HEAD_DIM, MASK, M, SimPool
from tests.engine.runners.sim.test_sim_pool import BLOCK, copy_blocks, runner

A = [5, 9, 14, 3, 7, 7, 1, 20, 11, 2]  # 10 tokens: 3 blocks, the last one half used
B = [8, 8, 2, 40, 6, 1, 0, 3, 9]  # 9 tokens: 3 blocks
TABLE_A, TABLE_B = [3, 7, 1], [0, 12, 5]
NEXT = 4

Fed = tuple[list[int], int, list[int]]  # all tokens so far, the first fed position, block table


def pool(head_dim: int = 2) -> SimPool:
    return SimPool(num_blocks=16, block_size=BLOCK, bytes_per_token=head_dim * BYTES_PER_HEAD_DIM,
                   max_model_len=64)


def step(p: SimPool, *seqs: Fed) -> list[int]:
    """One step feeding each sequence's tokens from its first fed position; the hashes."""
    hashes: list[int] = p.step([SeqInput(t[start:], start, table) for t, start, table in seqs]
                               ).tolist()
    return hashes


def rolling(tokens: list[int]) -> int:
    """The docstring's rolling hash, computed independently of the pool."""
    h = 0
    for t in tokens:
        h = (h * M + t + 1) & MASK
    return h


def prefilled(head_dim: int = 2) -> SimPool:
    p = pool(head_dim)
    assert step(p, (A, 0, TABLE_A), (B, 0, TABLE_B)) == [rolling(A), rolling(B)]
    return p


def decode(p: SimPool, count: int = 1) -> list[list[int]]:
    """``count`` decode steps of A and B, each feeding ``NEXT``; each step's hashes."""
    a, b, out = list(A), list(B), []
    for _ in range(count):
        a, b = [*a, NEXT], [*b, NEXT]
        out.append(step(p, (a, len(a) - 1, [*TABLE_A, 9]), (b, len(b) - 1, [*TABLE_B, 10])))
    return out


@settings(max_examples=300, deadline=None)
@given(head_dim=st.integers(1, 3), layer=st.integers(0, 1), kv=st.integers(0, 1),
       element=st.integers(0, 2), bit=st.integers(0, 63), position=st.integers(0, len(A) - 1))
@example(head_dim=2, layer=1, kv=0, element=1, bit=63, position=4)  # a weighted sum's blind spot
@example(head_dim=2, layer=0, kv=1, element=0, bit=61, position=0)
@example(head_dim=1, layer=0, kv=0, element=0, bit=62, position=len(A) - 1)  # the stored hash
def test_flipping_any_bit_of_a_used_slot_changes_the_next_hash(
        head_dim: int, layer: int, kv: int, element: int, bit: int, position: int) -> None:
    clean, damaged = prefilled(head_dim), prefilled(head_dim)
    slot = (layer, kv, TABLE_A[position // BLOCK], 0, position % BLOCK, element % head_dim)
    damaged.tensor[slot] ^= torch.tensor(1, dtype=torch.int64) << bit
    [[a, b]], [[hurt, other]] = decode(clean), decode(damaged)
    assert a == rolling([*A, NEXT])
    assert hurt != a
    assert other == b  # the damage is A's alone


@pytest.mark.parametrize("index", range(len(TABLE_A)))
def test_zeroing_a_block_changes_every_later_hash(index: int) -> None:
    clean, damaged = prefilled(), prefilled()
    damaged.tensor[:, :, TABLE_A[index]] = 0
    for (a, b), (hurt, other) in zip(decode(clean, 3), decode(damaged, 3), strict=True):
        assert hurt != a
        assert other == b


@pytest.mark.parametrize("index", range(len(TABLE_A)))
@pytest.mark.parametrize("swapped", ["contents", "tables"])
def test_swapping_two_sequences_blocks_changes_both_hashes(index: int, swapped: str) -> None:
    clean, damaged = prefilled(), prefilled()
    [[a, b]] = decode(clean)
    table_a, table_b = list(TABLE_A), list(TABLE_B)
    if swapped == "contents":
        pools = damaged.tensor
        ours, theirs = TABLE_A[index], TABLE_B[index]
        pools[:, :, [ours, theirs]] = pools[:, :, [theirs, ours]].clone()
    else:
        table_a[index], table_b[index] = TABLE_B[index], TABLE_A[index]
    hurt = step(damaged, ([*A, NEXT], len(A), [*table_a, 9]), ([*B, NEXT], len(B), [*table_b, 10]))
    assert hurt[0] != a
    assert hurt[1] != b


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=20), st.permutations(range(16)))
def test_the_same_tokens_through_other_block_ids_give_the_same_hash(
        prompt: list[int], ids: list[int]) -> None:
    blocks = (len(prompt) + BLOCK) // BLOCK  # enough for the prompt and one more token
    assert step(pool(), (prompt, 0, list(range(blocks)))) == [rolling(prompt)]
    assert step(pool(), (prompt, 0, ids[:blocks])) == [rolling(prompt)]
    # A transport moves the prompt's blocks to other ids on another pool, which decodes on.
    src, dst = runner(), runner()
    step(src.pool, (prompt, 0, list(range(blocks))))
    copy_blocks(src, dst, list(range(blocks)), ids[:blocks])
    longer = [*prompt, NEXT]
    assert step(dst.pool, (longer, len(prompt), ids[:blocks])) == [rolling(longer)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=30),
       st.lists(st.integers(1, 29), max_size=6))
def test_chunked_prefill_gives_the_one_step_hash(prompt: list[int], cuts: list[int]) -> None:
    table = [9, 2, 14, 3, 4, 11, 6, 8]  # none of B's
    [whole] = step(pool(), (prompt, 0, table))
    chunked = pool()
    start, other, other_table = 0, list(B), [*TABLE_B, 1, 13]
    step(chunked, (other, 0, TABLE_B))
    for end in [*sorted({c for c in cuts if c < len(prompt)}), len(prompt)]:
        other = [*other, end % 7]  # another sequence decodes in the same steps
        got = step(chunked, (prompt[:end], start, table), (other, len(other) - 1, other_table))
        assert got == [rolling(prompt[:end]), rolling(other)]
        start = end
    assert got[0] == whole


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=BLOCK, max_size=20),
       st.lists(st.integers(0, 255), min_size=1, max_size=10))
def test_a_reused_prefix_gives_the_fresh_hash(first: list[int], rest: list[int]) -> None:
    cached = len(first) // BLOCK * BLOCK  # the first sequence's full blocks
    second = [*first[:cached], *rest]
    warm = pool()
    step(warm, (first, 0, list(range(8))))
    reused = [*range(cached // BLOCK), 8, 9, 10, 11, 12]
    assert step(warm, (second, cached, reused)) == [rolling(second)]
    assert step(pool(), (second, 0, list(range(8, 16)))) == [rolling(second)]


def test_a_block_table_short_of_its_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="does not cover"):
        step(pool(), (A, 0, TABLE_A[:2]))


def test_a_pool_that_is_not_one_contiguous_tensor_is_refused() -> None:
    def transposed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape[::-1], dtype=dtype).permute(*reversed(range(len(shape))))

    with pytest.raises(ValueError, match="contiguous"):
        SimPool(num_blocks=4, block_size=BLOCK, bytes_per_token=64, max_model_len=8,
                allocate=transposed)
