"""The sim runner's KV pool holds its state: blocks copied to another runner carry the
sequence on, and a wrong block changes the text."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fdcore.engine.runner import SeqInput
from fdcore.engine.runners.sim.runner import SimProfile, SimRunner
from fdcore.kv import KVLayout, plan_copies

BLOCK = 4
PROFILE = SimProfile.model_validate({"prefill-seconds-per-token": 0,
                                     "decode-seconds-per-step": 0, "decode-seconds-per-seq": 0})


def runner(num_blocks: int = 16) -> SimRunner:
    return SimRunner(PROFILE, BLOCK, num_blocks, max_model_len=256)


def generate(sim: SimRunner, tokens: list[int], table: list[int], start: int, count: int,
             ) -> list[int]:
    """Feed ``tokens[start:]`` then decode ``count`` tokens greedily; returns them."""
    out: list[int] = []
    fed, pos = tokens[start:], start
    for _ in range(count):
        logits = sim.forward([SeqInput(fed, pos, table)])
        token = int(logits[0].argmax())
        out.append(token)
        pos += len(fed)
        fed = [token]
    return out


def layout_of(sim: SimRunner) -> KVLayout:
    keys, _ = sim.kv_caches()[0]
    blocks, heads, size, dim = keys.shape
    return KVLayout(len(sim.kv_caches()), blocks, heads, size, dim, "int64", "sim")


def copy_blocks(src: SimRunner, dst: SimRunner, src_ids: list[int], dst_ids: list[int]) -> None:
    """Move the blocks' bytes as a transport would: the planned byte ranges, pool to pool."""
    source = src.pool.tensor.view(-1).view(dtype=torch.uint8)
    target = dst.pool.tensor.view(-1).view(dtype=torch.uint8)
    for c in plan_copies(layout_of(src), layout_of(dst), src_ids, dst_ids):
        target[c.dst:c.dst + c.nbytes] = source[c.src:c.src + c.nbytes]


PROMPT = [5, 9, 14, 3, 7, 7, 1, 20, 11, 2]  # 10 tokens: blocks 0..2 of the table


def test_the_pool_is_laid_out_like_the_torch_runners() -> None:
    sim = runner()
    caches = sim.kv_caches()
    assert len(caches) == 2
    for keys, values in caches:
        assert keys.shape == values.shape == (16, 1, BLOCK, 2)
    assert sim.pool.tensor.shape == (2, 2, 16, 1, BLOCK, 2)


def test_copied_blocks_carry_the_sequence_on_another_runner() -> None:
    a, b = runner(), runner(32)
    expected = generate(a, PROMPT, [0, 1, 2, 3, 4], 0, 9)
    # P prefills (the first token), then its prompt blocks move to other ids on D.
    a2 = runner()
    [first] = generate(a2, PROMPT, [3, 7, 1], 0, 1)
    copy_blocks(a2, b, [3, 7, 1], [20, 5, 9])
    # D feeds the first token at the prompt's end and decodes on, over its own table.
    table = [20, 5, 9, 11, 12]
    rest = generate(b, [*PROMPT, first], table, len(PROMPT), 8)
    assert [first, *rest] == expected


def test_a_wrong_or_missing_block_changes_the_text() -> None:
    a = runner()
    expected = generate(a, PROMPT, [0, 1, 2, 3, 4], 0, 6)
    for damage in ("missing", "altered"):
        p, d = runner(), runner()
        [first] = generate(p, PROMPT, [0, 1, 2], 0, 1)
        copy_blocks(p, d, [0, 2], [0, 2]) if damage == "missing" else copy_blocks(
            p, d, [0, 1, 2], [0, 1, 2])
        if damage == "altered":
            d.pool.tensor[1, 1, 1, 0, 2, 1] += 1  # one element of block 1, layer 1's V
        rest = generate(d, [*PROMPT, first], [0, 1, 2, 3, 4], len(PROMPT), 5)
        assert [first, *rest] != expected, damage


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=BLOCK + 1, max_size=30))
def test_a_prefix_from_the_cache_gives_the_cold_text(prompt: list[int]) -> None:
    cold = generate(runner(), prompt, list(range(10)), 0, 4)
    warm = runner()
    cached = (len(prompt) - 1) // BLOCK * BLOCK  # whole blocks, the last token fed again
    generate(warm, [*prompt[:cached], 0], list(range(10)), 0, 1)  # another request fills them
    assert generate(warm, prompt, list(range(10)), cached, 4) == cold
