"""Prompt block hashes: FastDeploy's FNV-1a-64 chain over full blocks of tokens.

Block ``i`` hashes to ``FNV-1a-64(LE64(h[i-1]) || LE64(t[0]) || ... || LE64(t[B-1]))`` with
``h[-1] = seed``; a trailing partial block is ignored. Tokens are Unicode code points when no
tokenizer is configured, so a ``str`` is accepted directly.

FastDeploy draws the seed at random when the process starts; fdcore takes it from config
(default 0) so hashes are reproducible across restarts and identical across router replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1
# _PRIME_POW[k] = prime**k mod 2**64: a run of k zero bytes only multiplies by the prime, and
# most bytes of an LE64 token are zero, so they are folded into one multiplication.
_PRIME_POW = [pow(_FNV_PRIME, k, 1 << 64) for k in range(9)]
# Chat prompts repeat their history turn after turn, so most blocks have been hashed before.
_MEMO_BLOCKS = 1 << 15


def block_hashes(tokens: str | Sequence[int], block_size: int, seed: int) -> list[int]:
    """Hash every full ``block_size`` block of ``tokens``, each chained to the one before."""
    hashes: list[int] = []
    prev = seed
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[start : start + block_size]
        key: str | tuple[int, ...] = block if isinstance(block, str) else tuple(block)
        prev = _hash_block(prev, key)
        hashes.append(prev)
    return hashes


@lru_cache(maxsize=_MEMO_BLOCKS)
def _hash_block(prev: int, block: str | tuple[int, ...]) -> int:
    h = _fnv_word(_FNV_OFFSET, prev)
    values = map(ord, block) if isinstance(block, str) else block
    for value in values:
        h = _fnv_word(h, value)
    return h


def _fnv_word(h: int, value: int) -> int:
    """Feed the 8 little-endian bytes of ``value`` (mod 2**64) into FNV-1a state ``h``."""
    value &= _MASK
    for used in range(8):
        if not value:
            return (h * _PRIME_POW[8 - used]) & _MASK
        h = ((h ^ (value & 0xFF)) * _FNV_PRIME) & _MASK
        value >>= 8
    return h
