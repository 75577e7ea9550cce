"""The ``sim`` model's KV pool: int64 slots laid out exactly like the torch runner's cache.

One allocation ``[num_layers, 2, num_blocks, kv_heads, block_size, head_dim]`` with 2 layers, 1
KV head and ``head_dim = bytes_per_token // 32`` int64 elements, so a block id names the same
slot in every layer and transports move sim blocks as they move real ones.

For position ``p`` of a sequence with tokens ``t_0 .. t_p`` a step writes, in every layer,

* ``K[e] = h_p ^ salt[e]``, where ``h_p = sum_j (t_j + 1) * M**(p - j) mod 2**61`` is the rolling
  hash of the sequence so far (``h_p = (h_{p-1} * M + t_p + 1) mod 2**61``),
* ``V[e] = (t_p + 1) ^ salt[e]``.

To emit, a step reads every slot of the sequence back through its block table and sums, with
fixed odd weights, each element's distance from what a consistent slot holds (all K elements
equal to ``h_p``, all V elements to ``v_p``, and ``h_p = h_{p-1} * M + v_p``). The next token is
drawn from ``h_last + residual``: a consistent pool gives exactly the rolling hash, so the text
is the same however the blocks got there; a wrong, missing (zeroed) or altered block makes the
residual non-zero and changes the text.

Arithmetic is int64 and wraps mod 2**64; masking to 61 bits afterwards gives the same value as
exact arithmetic because reduction mod 2**61 commutes with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fdcore.engine.runner import SeqInput

__all__ = ["Allocate", "SimPool"]

Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
"""Allocates a zeroed tensor of a shape and dtype (the KV transports' hook for shared memory)."""

NUM_LAYERS = 2
KV_HEADS = 1
DTYPE = torch.int64
BYTES_PER_ELEMENT = 8
BYTES_PER_HEAD_DIM = NUM_LAYERS * 2 * KV_HEADS * BYTES_PER_ELEMENT  # 32: one head_dim step

M = 1_000_003
MASK = (1 << 61) - 1


def _signed(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _splitmix(i: int) -> int:
    z = (i * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return z ^ (z >> 31)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


class SimPool:
    """The pool tensor, its per-layer K/V views, and the step's write and read-back."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        bytes_per_token: int,
        max_model_len: int,
        allocate: Allocate | None = None,
    ) -> None:
        head_dim = bytes_per_token // BYTES_PER_HEAD_DIM
        shape = (NUM_LAYERS, 2, num_blocks, KV_HEADS, block_size, head_dim)
        self.block_size = block_size
        self.tensor = (allocate or _zeros)(shape, DTYPE)
        if tuple(self.tensor.shape) != shape or self.tensor.dtype != DTYPE:
            raise ValueError(f"sim KV pool: allocator gave {tuple(self.tensor.shape)} "
                             f"{self.tensor.dtype}, wanted {shape} {DTYPE}")
        self.caches = [(layer[0], layer[1]) for layer in self.tensor.unbind(0)]
        elems = (NUM_LAYERS, 2, KV_HEADS, head_dim)
        count = NUM_LAYERS * 2 * KV_HEADS * head_dim
        # Zero salts would let a never-written (zeroed) slot pass for token -1's hash 0.
        self._salt = torch.tensor([_signed(_splitmix(i) | 1) for i in range(count)]).view(elems)
        self._weight = torch.tensor(
            [_signed(_splitmix(count + i) | 1) for i in range(count)]
        ).view(elems)
        self._chain_weight = _signed(_splitmix(2 * count) | 1)
        m_inv = pow(M, -1, 1 << 64)
        self._m_pow = torch.tensor([_signed(pow(M, i, 1 << 64)) for i in range(max_model_len + 1)])
        self._m_inv_pow = torch.tensor(
            [_signed(pow(m_inv, i, 1 << 64)) for i in range(max_model_len + 1)]
        )

    def step(self, seqs: Sequence[SeqInput]) -> torch.Tensor:
        """Write the fed tokens' slots, then return each sequence's 61-bit hash as read back."""
        fed = [len(s.token_ids) for s in seqs]
        starts = [s.start_pos for s in seqs]
        ends = [s.start_pos + n for s, n in zip(seqs, fed, strict=True)]
        tables = [torch.as_tensor(s.block_table[: (e + self.block_size - 1) // self.block_size],
                                  dtype=torch.int64) for s, e in zip(seqs, ends, strict=True)]
        table_at = torch.tensor([0, *[len(t) for t in tables]]).cumsum(0)[:-1]
        table = torch.cat(tables)
        tokens = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.int64)

        base = self._read_hash(table, table_at, torch.tensor(starts) - 1)
        seg, rel = _segments(torch.tensor(fed))
        pos = torch.tensor(starts)[seg] + rel
        hashes = self._chain(base, tokens + 1, seg, rel)
        values = torch.stack((hashes, tokens + 1), 1)[:, None, :, None, None] ^ self._salt
        blocks, offsets = self._slots(table, table_at, seg, pos)
        self.tensor[:, :, blocks, :, offsets, :] = values

        lengths = torch.tensor(ends)
        seg, pos = _segments(lengths)
        blocks, offsets = self._slots(table, table_at, seg, pos)
        return self._read_back(self.tensor[:, :, blocks, :, offsets, :] ^ self._salt, seg, pos,
                               lengths)

    def _slots(self, table: torch.Tensor, table_at: torch.Tensor, seg: torch.Tensor,
               pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return table[table_at[seg] + pos // self.block_size], pos % self.block_size

    def _read_hash(self, table: torch.Tensor, table_at: torch.Tensor,
                   pos: torch.Tensor) -> torch.Tensor:
        """The stored hash at ``pos`` for each sequence, 0 where ``pos`` is -1."""
        seg = torch.arange(len(pos))
        blocks, offsets = self._slots(table, table_at, seg, pos.clamp(min=0))
        stored = self.tensor[0, 0, blocks, 0, offsets, 0] ^ self._salt[0, 0, 0, 0]
        return torch.where(pos >= 0, stored, 0)

    def _chain(self, base: torch.Tensor, values: torch.Tensor, seg: torch.Tensor,
               rel: torch.Tensor) -> torch.Tensor:
        """``h_i = h_{i-1} * M + v_i`` from each segment's ``base`` in closed form:
        ``h_i = M**i * (M * base + sum_{j<=i} v_j * M**-j)``."""
        scaled = values * self._m_inv_pow[rel]
        total = scaled.cumsum(0)
        before = total - scaled
        first = torch.nonzero(rel == 0).flatten()
        local = total - before[first][seg]
        return (self._m_pow[rel] * (base[seg] * M + local)) & MASK

    def _read_back(self, slots: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor,
                   lengths: torch.Tensor) -> torch.Tensor:
        """Each sequence's hash from its unsalted ``slots`` ``[positions, layers, 2, heads,
        head_dim]`` (position ``pos`` of sequence ``seg``, sequences of ``lengths``)."""
        h = slots[:, 0, 0, 0, 0]
        v = slots[:, 0, 1, 0, 0]
        expected = torch.stack((h, v), 1)[:, None, :, None, None]
        residual = ((slots - expected) * self._weight).flatten(1).sum(1)
        prev = torch.where(pos > 0, h.roll(1), 0)
        residual += (((prev * M + v) & MASK) - h) * self._chain_weight
        per_seq = torch.zeros(len(lengths), dtype=torch.int64).index_add_(0, seg, residual)
        return (h[lengths.cumsum(0) - 1] + per_seq) & MASK


def _segments(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For segments of ``lengths``: each element's segment and its index within it."""
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = lengths.cumsum(0) - lengths
    return seg, torch.arange(len(seg)) - starts[seg]
