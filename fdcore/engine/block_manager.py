"""Paged KV-cache bookkeeping: which cache blocks each sequence holds, shared via the prefix cache.

Every block is in exactly one state: free (never cached or forgotten), used (reference count
above zero) or evictable (cached, unreferenced). ``num_available`` counts free plus evictable:
what an allocation can take right now.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from fdcore.engine.prefix_cache import ROOT_HASH, PrefixCache, chain_hash


class OutOfBlocks(Exception):
    """An allocation asked for more blocks than are available (nothing was taken)."""


@dataclass(slots=True)
class BlockTable:
    """The blocks one sequence holds, in position order.

    ``keys`` are the prefix-cache keys of the leading blocks that are full and computed; they
    are extended as computation fills blocks (and stay empty with prefix caching off).
    """

    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    committed: int = 0  # leading blocks already offered to the prefix cache


class BlockManager:
    """Allocates, shares and frees the engine's KV-cache blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.cache = PrefixCache()
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._num_used = 0

    @property
    def num_available(self) -> int:
        """Blocks an allocation can take now (free plus evictable cached ones)."""
        return len(self._free) + self.cache.num_evictable

    @property
    def num_free(self) -> int:
        """Blocks holding nothing at all."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self._num_used

    def refcount(self, block: int) -> int:
        """How many sequences hold ``block``."""
        return self._refs[block]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)

    def allocate_prompt(self, table: BlockTable, tokens: Sequence[int]) -> int:
        """Fill an empty ``table`` for ``tokens``, reusing cached prefix blocks.

        Returns how many leading tokens are already computed (a multiple of the block size,
        always less than ``len(tokens)`` so the last token is fed and yields logits). Raises
        :class:`OutOfBlocks`, leaving everything as it was, when the rest does not fit.
        """
        cached = self._match(table, tokens) if self.enable_prefix_caching else 0
        try:
            self._extend(table, self.blocks_for(len(tokens)) - len(table.blocks))
        except OutOfBlocks:
            self.free(table)
            raise
        return cached

    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Make ``table`` cover ``num_tokens`` positions; False (nothing taken) if it can't."""
        try:
            self._extend(table, self.blocks_for(num_tokens) - len(table.blocks))
        except OutOfBlocks:
            return False
        return True

    def commit(self, table: BlockTable, tokens: Sequence[int], num_computed: int) -> None:
        """Offer the blocks that ``num_computed`` tokens have filled to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        for index in range(table.committed, num_computed // size):
            parent = table.keys[-1] if table.keys else ROOT_HASH
            key = chain_hash(parent, tokens[index * size : (index + 1) * size])
            table.keys.append(key)
            self.cache.insert(key, table.blocks[index])
        table.committed = max(table.committed, num_computed // size)

    def free(self, table: BlockTable) -> None:
        """Drop ``table``'s references and empty it.

        Blocks go back last-first, so the LRU list evicts the tail of a prefix before its head.
        """
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._num_used -= 1
                if self.cache.is_cached(block):
                    self.cache.park(block)
                else:
                    self._free.append(block)
        table.blocks.clear()
        table.keys.clear()
        table.committed = 0

    def _match(self, table: BlockTable, tokens: Sequence[int]) -> int:
        size = self.block_size
        parent = ROOT_HASH
        for index in range((len(tokens) - 1) // size):
            key = chain_hash(parent, tokens[index * size : (index + 1) * size])
            block = self.cache.lookup(key)
            if block is None:
                break
            self._ref(block)
            table.blocks.append(block)
            table.keys.append(key)
            parent = key
        table.committed = len(table.blocks)
        return len(table.blocks) * size

    def _extend(self, table: BlockTable, count: int) -> None:
        if count <= 0:
            return
        if count > self.num_available:
            raise OutOfBlocks(f"need {count} blocks, {self.num_available} available")
        for _ in range(count):
            block = self._free.popleft() if self._free else self.cache.evict()
            assert block is not None  # guaranteed by the availability check above
            self._ref(block)
            table.blocks.append(block)

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            self._num_used += 1
            self.cache.unpark(block)
        self._refs[block] += 1
