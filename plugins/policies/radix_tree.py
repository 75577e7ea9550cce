"""A radix tree of block-hash chains recording which instances have seen which prefixes.

Each node holds a run of block hashes (the edge from its parent) and, per instance, when that
instance last received a prompt running through the node. Inserting tags every node on the path,
so an instance found on a node is also found on all of that node's ancestors, with an access time
at least as recent; expiry and capacity eviction both preserve this, which is what lets
:meth:`RadixTree.match` stop at the deepest node an instance appears on.

Memory is bounded by the number of stored block hashes (``max_blocks``); every node but the root
holds at least one, so the node count is bounded too.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterator, Sequence


class _Node:
    __slots__ = ("children", "depth", "key", "owners", "parent")

    def __init__(self, key: tuple[int, ...], parent: _Node | None, depth: int) -> None:
        self.key = key
        self.parent = parent
        self.depth = depth  # blocks from the root to the end of this node's edge
        self.children: dict[int, _Node] = {}
        self.owners: dict[str, float] = {}

    def last_access(self) -> float:
        return max(self.owners.values(), default=float("-inf"))


class RadixTree:
    """Per-instance prefix index over block-hash chains, with expiry and an LRU block cap.

    :param max_blocks: most block hashes held at once; least recently used leaves go first.
    :param ttl: seconds after which an instance's unrefreshed entry expires
        (see :meth:`evict_expired`).
    """

    # After an overflow, evict down to this share of the cap so eviction runs rarely.
    LOW_WATER = 0.9

    def __init__(self, max_blocks: int, ttl: float) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        self.max_blocks = max_blocks
        self.ttl = ttl
        self._root = _Node((), None, 0)
        self._blocks = 0
        self._nodes = 0
        self._instance_blocks: dict[str, int] = {}

    @property
    def blocks(self) -> int:
        """Block hashes stored (the memory bound applies to this)."""
        return self._blocks

    @property
    def node_count(self) -> int:
        """Nodes other than the root; never more than :attr:`blocks`."""
        return self._nodes

    def instance_blocks(self, instance: str) -> int:
        """How many stored blocks are tagged with ``instance`` (its share of the index)."""
        return self._instance_blocks.get(instance, 0)

    def insert(self, hashes: Sequence[int], instance: str, now: float) -> None:
        """Record that ``instance`` received a prompt with this block-hash chain at ``now``."""
        # A chain longer than the cap could never be held whole; keep its prefix.
        hashes = hashes[: self.max_blocks]
        node = self._root
        self._tag(node, instance, now)
        i = 0
        while i < len(hashes):
            child = node.children.get(hashes[i])
            if child is None:
                child = _Node(tuple(hashes[i:]), node, node.depth + len(hashes) - i)
                node.children[hashes[i]] = child
                self._blocks += len(child.key)
                self._nodes += 1
                self._tag(child, instance, now)
                break
            common = _common_prefix(child.key, hashes, i)
            if common < len(child.key):
                child = self._split(child, common)
            self._tag(child, instance, now)
            node = child
            i += common
        if self._blocks > self.max_blocks:
            # Never below the chain just inserted: it is the most recently used entry.
            self._evict_lru(max(int(self.max_blocks * self.LOW_WATER), len(hashes)))

    def match(self, hashes: Sequence[int], allowed: Collection[str]) -> dict[str, int]:
        """How many leading blocks of ``hashes`` each instance in ``allowed`` has seen.

        Instances with no matching block are left out. A partial match of an edge counts the
        blocks matched within it. Cost: one walk down the prompt's path plus a binary search
        of that path per allowed instance, never a test of every instance at every node.
        """
        path: list[tuple[_Node, int]] = []  # (node, blocks matched through it)
        node = self._root
        i = 0
        while i < len(hashes):
            child = node.children.get(hashes[i])
            if child is None:
                break
            common = _common_prefix(child.key, hashes, i)
            path.append((child, node.depth + common))
            if common < len(child.key):
                break
            node = child
            i += common
        result: dict[str, int] = {}
        for instance in allowed:
            # The nodes carrying an instance form a prefix of the path (tagging invariant).
            lo, hi = 0, len(path)
            while lo < hi:
                mid = (lo + hi) // 2
                if instance in path[mid][0].owners:
                    lo = mid + 1
                else:
                    hi = mid
            if lo:
                result[instance] = path[lo - 1][1]
        return result

    def evict_expired(self, now: float) -> int:
        """Drop entries not refreshed within ``ttl`` of ``now``; return blocks freed."""
        cutoff = now - self.ttl
        before = self._blocks
        self._expire(self._root, cutoff)
        stack = [self._root]
        while stack:
            node = stack.pop()
            for child in list(node.children.values()):
                self._expire(child, cutoff)
                if child.owners:
                    stack.append(child)
                else:
                    self._remove_subtree(child)
        return before - self._blocks

    def remove_instance(self, instance: str) -> None:
        """Forget every entry of ``instance`` (it left the registry)."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            if instance not in node.owners:
                continue  # by the tagging invariant, nothing below carries it either
            self._untag(node, instance)
            for child in list(node.children.values()):
                if instance in child.owners and len(child.owners) == 1:
                    self._remove_subtree(child)
                else:
                    stack.append(child)
        self._instance_blocks.pop(instance, None)

    def _tag(self, node: _Node, instance: str, now: float) -> None:
        if node.key and instance not in node.owners:
            self._instance_blocks[instance] = self._instance_blocks.get(instance, 0) + len(
                node.key
            )
        node.owners[instance] = now

    def _expire(self, node: _Node, cutoff: float) -> None:
        for instance in [i for i, seen in node.owners.items() if seen < cutoff]:
            self._untag(node, instance)

    def _untag(self, node: _Node, instance: str) -> None:
        del node.owners[instance]
        if not node.key:
            return  # the root holds no blocks
        left = self._instance_blocks[instance] - len(node.key)
        if left:
            self._instance_blocks[instance] = left
        else:
            del self._instance_blocks[instance]

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut ``child``'s edge after ``at`` blocks; return the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = _Node(child.key[:at], parent, parent.depth + at)
        # Splitting divides the edge but not its blocks: per-instance totals stay the same.
        upper.owners = dict(child.owners)
        parent.children[child.key[0]] = upper
        child.key = child.key[at:]
        child.parent = upper
        upper.children[child.key[0]] = child
        self._nodes += 1
        return upper

    def _remove_subtree(self, top: _Node) -> None:
        parent = top.parent
        assert parent is not None
        del parent.children[top.key[0]]
        for node in _walk(top):
            for instance in list(node.owners):
                self._untag(node, instance)
            self._blocks -= len(node.key)
            self._nodes -= 1

    def _evict_lru(self, target: int) -> None:
        leaves = (node for node in _walk(self._root) if _is_leaf(node))
        heap = [(leaf.last_access(), id(leaf), leaf) for leaf in leaves]
        heapq.heapify(heap)
        while self._blocks > target and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            self._remove_subtree(leaf)
            if parent is not self._root and not parent.children:
                heapq.heappush(heap, (parent.last_access(), id(parent), parent))


def _is_leaf(node: _Node) -> bool:
    return node.parent is not None and not node.children


def _walk(top: _Node) -> Iterator[_Node]:
    stack = [top]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())


def _common_prefix(key: tuple[int, ...], hashes: Sequence[int], start: int) -> int:
    limit = min(len(key), len(hashes) - start)
    n = 0
    while n < limit and key[n] == hashes[start + n]:
        n += 1
    return n
