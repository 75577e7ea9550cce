"""The KV pool's layout and the copy plan every transport follows (no torch needed).

An engine's KV pool is one allocation ``[num_layers, 2, num_blocks, kv_heads, block_size,
head_dim]`` (K then V per layer); a block id names the same slot in every layer. So a block of
one layer's K (or V) is ``block_bytes`` contiguous bytes at
``((layer * 2 + kv) * num_blocks + block) * block_bytes``, and a run of consecutive block ids is
one contiguous range. :func:`plan_copies` turns ``(src_block_ids, dst_block_ids, layers)`` into
the fewest ``(src_offset, dst_offset, nbytes)`` ranges: a memcpy list for ``ipc``, frames for
``tcp``, RDMA WRITE work requests for ``rdma``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

# Bytes per element of the dtypes a pool may hold (torch's names).
DTYPE_BYTES = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1,
}


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The shape of one engine's KV pool; both ends of a transfer check theirs match.

    ``model`` names the model the cache belongs to (the served name or weights file); pools of
    different models, dtypes or shapes cannot exchange blocks even when their sizes agree.
    """

    num_layers: int
    num_blocks: int
    kv_heads: int
    block_size: int
    head_dim: int
    dtype: str = "float32"
    model: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"KVLayout.dtype: unknown dtype {self.dtype!r}")
        for name in ("num_layers", "num_blocks", "kv_heads", "block_size", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVLayout.{name}: must be at least 1")

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """The pool tensor's shape."""
        return (self.num_layers, 2, self.num_blocks, self.kv_heads, self.block_size,
                self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V)."""
        return self.kv_heads * self.block_size * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def pool_bytes(self) -> int:
        """Bytes of the whole pool."""
        return self.num_layers * 2 * self.num_blocks * self.block_bytes

    def offset(self, layer: int, kv: int, block: int) -> int:
        """Byte offset of ``block`` of ``layer``'s K (``kv`` 0) or V (``kv`` 1) in the pool."""
        return ((layer * 2 + kv) * self.num_blocks + block) * self.block_bytes

    def fingerprint(self) -> str:
        """What must agree between P and D (everything but ``num_blocks``), hashed short."""
        key = (f"{self.model}|{self.dtype}|{self.num_layers}|{self.kv_heads}|{self.head_dim}|"
               f"{self.block_size}")
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def mismatch(self, other: KVLayout) -> str | None:
        """Why blocks of ``self`` cannot be written into ``other`` (``None``: they can)."""
        for name in ("model", "dtype", "num_layers", "kv_heads", "head_dim", "block_size"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"KV layouts differ: {name} {mine!r} here, {theirs!r} there"
        return None


@dataclass(frozen=True, slots=True)
class Copy:
    """One contiguous range: ``nbytes`` from ``src`` in the sender's pool to ``dst`` in the
    receiver's."""

    src: int
    dst: int
    nbytes: int


def plan_copies(
    src: KVLayout, dst: KVLayout, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
    layers: Sequence[int] | None = None,
) -> list[Copy]:
    """The ranges that copy ``src_block_ids[i]`` to ``dst_block_ids[i]`` in every layer (or in
    ``layers``), K and V, merging runs that are consecutive on both sides.

    Raises :class:`ValueError` for mismatched layouts, lists of different lengths, a block id
    outside either pool, or a destination block listed twice.
    """
    problem = src.mismatch(dst)
    if problem:
        raise ValueError(problem)
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} "
                         "destination blocks")
    if len(set(dst_block_ids)) != len(dst_block_ids):
        raise ValueError("a destination block is listed twice")
    for ids, layout, side in ((src_block_ids, src, "source"), (dst_block_ids, dst, "destination")):
        bad = [b for b in ids if not 0 <= b < layout.num_blocks]
        if bad:
            raise ValueError(f"{side} block {bad[0]} outside 0..{layout.num_blocks - 1}")
    chosen = range(src.num_layers) if layers is None else layers
    for layer in chosen:
        if not 0 <= layer < src.num_layers:
            raise ValueError(f"layer {layer} outside 0..{src.num_layers - 1}")
    runs = _runs(src_block_ids, dst_block_ids)
    size = src.block_bytes
    return [
        Copy(src.offset(layer, kv, s), dst.offset(layer, kv, d), n * size)
        for layer in chosen for kv in (0, 1) for s, d, n in runs
    ]


def _runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, count)`` for stretches consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs
