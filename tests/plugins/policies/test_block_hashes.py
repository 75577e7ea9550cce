"""Block hashes: FastDeploy's FNV-1a-64 chain, checked against a byte-by-byte reference."""

from __future__ import annotations

import struct

from fdcore_plugins.policies.block_hashes import block_hashes
from hypothesis import given
from hypothesis import strategies as st


def reference(tokens: list[int], block_size: int, seed: int) -> list[int]:
    """Spec 2.5 step 4, written plainly: FNV-1a-64 over LE64(prev) || LE64(tok)..."""
    out, prev = [], seed
    for start in range(0, len(tokens) - block_size + 1, block_size):
        data = struct.pack("<Q", prev) + b"".join(
            struct.pack("<Q", t) for t in tokens[start : start + block_size]
        )
        h = 0xCBF29CE484222325
        for byte in data:
            h = ((h ^ byte) * 0x100000001B3) % (1 << 64)
        prev = h
        out.append(h)
    return out


seeds = st.integers(0, (1 << 64) - 1)


@given(st.text(max_size=300), st.integers(1, 40), seeds)
def test_characters_hash_as_code_points(text: str, block_size: int, seed: int) -> None:
    assert block_hashes(text, block_size, seed) == reference(
        [ord(c) for c in text], block_size, seed
    )


@given(st.lists(st.integers(0, (1 << 32) - 1), max_size=200), st.integers(1, 40), seeds)
def test_token_ids(ids: list[int], block_size: int, seed: int) -> None:
    assert block_hashes(ids, block_size, seed) == reference(ids, block_size, seed)


@given(st.text(min_size=1, max_size=300), st.text(max_size=100), st.integers(1, 16))
def test_chain_is_prefix_stable(head: str, tail: str, block_size: int) -> None:
    whole = block_hashes(head + tail, block_size, 0)
    assert whole[: len(head) // block_size] == block_hashes(head, block_size, 0)


def test_partial_block_is_ignored_and_seed_matters() -> None:
    assert block_hashes("x" * 63, 64, 0) == []
    assert len(block_hashes("x" * 130, 64, 0)) == 2
    assert block_hashes("x" * 64, 64, 0) != block_hashes("x" * 64, 64, 1)
