"""Prefix cache: full KV blocks found again by a hash chain over their tokens.

A block's key hashes its parent block's key together with its own tokens, so one key names a
whole prefix and a lookup walks a prompt block by block. Cached blocks that no sequence uses
stay in an LRU list and are reused (forgotten) only when the free list runs dry.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

ROOT_HASH = b""


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Key of a full block holding ``tokens`` whose prefix has key ``parent``.

    A cryptographic digest, not Python's ``hash``: a collision would hand one request another
    request's cache.
    """
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class PrefixCache:
    """Maps block keys to block ids and keeps the unreferenced cached blocks in LRU order."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_evictable(self) -> int:
        """Cached blocks no sequence references (reusable on demand)."""
        return len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks currently reachable through a key."""
        return len(self._block_of)

    def lookup(self, key: bytes) -> int | None:
        """The block holding the prefix named by ``key``, if cached."""
        return self._block_of.get(key)

    def insert(self, key: bytes, block: int) -> None:
        """Remember that ``block`` holds ``key``; a key cached elsewhere already stays as is."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def is_cached(self, block: int) -> bool:
        """Whether ``block`` is reachable through a key."""
        return block in self._key_of

    def park(self, block: int) -> None:
        """``block`` lost its last reference: keep it, most recently used last."""
        self._evictable[block] = None

    def unpark(self, block: int) -> None:
        """``block`` is referenced again: it may no longer be evicted."""
        self._evictable.pop(block, None)

    def evict(self) -> int | None:
        """Forget the least recently used unreferenced block and return it (None if none)."""
        if not self._evictable:
            return None
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block
