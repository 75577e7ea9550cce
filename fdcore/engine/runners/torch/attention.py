"""Paged attention: a batch plan built once per forward, cache writes and SDPA over block tables.

Tokens of all sequences are packed into one ``[tokens, ...]`` tensor so every linear layer is a
single matmul. For attention, sequences fed the same number of tokens form a group (all decodes
are one group; equal-length prefill chunks share one too), so queries never need padding: only
the key length is padded to the group's longest block table and masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

import torch
import torch.nn.functional as F

from fdcore.engine.runner import SeqInput

__all__ = ["AttentionGroup", "BatchPlan", "CacheShape", "paged_attention", "plan_batch", "write_kv"]


@dataclass(slots=True)
class AttentionGroup:
    """Sequences that were each fed ``q_len`` tokens, attended in one SDPA call."""

    rows: slice
    batch: int
    q_len: int
    kv_len: int
    """Key length after padding to the group's longest block table."""
    read_rows: torch.Tensor
    """Rows of a layer's flattened ``[2 * num_blocks * kv_heads * block_size, head_dim]`` cache
    that form K then V as ``[2, batch, kv_heads, kv_len, head_dim]``. Short block tables are
    padded with block 0; the mask hides those keys."""
    mask: torch.Tensor
    """``[batch, 1, heads_per_kv * q_len, kv_len]`` bool, True where attended."""


@dataclass(slots=True)
class BatchPlan:
    """Everything a forward needs about the batch, shared by all layers (a block id names the
    same slot in every layer, so the cache row indices are computed once)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    write_rows: torch.Tensor
    """``[2, tokens * kv_heads]`` cache rows receiving the fed tokens' K (row 0) and V (row 1)."""
    groups: list[AttentionGroup]
    last_rows: torch.Tensor
    """Packed row of each input sequence's last fed token, in input order."""


@dataclass(frozen=True, slots=True)
class CacheShape:
    """The per-layer cache geometry the row indices are computed against."""

    num_blocks: int
    kv_heads: int
    block_size: int

    def rows(self, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows of ``(block, head, offset)`` for every head: shape ``[2, *blocks.shape, heads]``
        (K rows, then V rows one cache-half further)."""
        heads = torch.arange(self.kv_heads)
        k = (blocks[..., None] * self.kv_heads + heads) * self.block_size + offsets[..., None]
        half = self.num_blocks * self.kv_heads * self.block_size
        return torch.stack((k, k + half))


def _check(seq: SeqInput, index: int, block_size: int, num_blocks: int, max_len: int) -> None:
    end = seq.start_pos + len(seq.token_ids)
    if not seq.token_ids:
        raise ValueError(f"sequence {index}: no tokens to feed")
    if seq.start_pos < 0 or end > max_len:
        raise ValueError(
            f"sequence {index}: positions {seq.start_pos}..{end - 1} outside 0..{max_len - 1}"
        )
    needed = -(-end // block_size)
    if len(seq.block_table) < needed:
        raise ValueError(
            f"sequence {index}: block table has {len(seq.block_table)} blocks, "
            f"positions up to {end - 1} need {needed}"
        )
    if min(seq.block_table[:needed]) < 0 or max(seq.block_table[:needed]) >= num_blocks:
        raise ValueError(f"sequence {index}: block id outside 0..{num_blocks - 1}")


def plan_batch(
    seqs: Sequence[SeqInput],
    *,
    cache: CacheShape,
    max_model_len: int,
    heads_per_kv: int,
    device: torch.device,
) -> BatchPlan:
    """Validate ``seqs`` and lay them out for one forward (tensors built once, on ``device``)."""
    block_size = cache.block_size
    for i, seq in enumerate(seqs):
        _check(seq, i, block_size, cache.num_blocks, max_model_len)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].token_ids))
    tokens: list[int] = []
    positions: list[int] = []
    blocks: list[int] = []
    last_rows = [0] * len(seqs)
    groups: list[AttentionGroup] = []
    for q_len, members in groupby(order, key=lambda i: len(seqs[i].token_ids)):
        ids = list(members)
        first_row = len(tokens)
        for i in ids:
            seq = seqs[i]
            span = range(seq.start_pos, seq.start_pos + q_len)
            tokens.extend(seq.token_ids)
            positions.extend(span)
            blocks.extend(seq.block_table[p // block_size] for p in span)
            last_rows[i] = len(tokens) - 1
        rows = slice(first_row, len(tokens))
        groups.append(_group(seqs, ids, rows, q_len, cache, heads_per_kv, device))
    pos = torch.tensor(positions, dtype=torch.int64)
    write_rows = cache.rows(torch.tensor(blocks, dtype=torch.int64), pos % block_size)
    return BatchPlan(
        tokens=torch.tensor(tokens, dtype=torch.int64).to(device),
        positions=pos.to(device),
        write_rows=write_rows.flatten(1).to(device),
        groups=groups,
        last_rows=torch.tensor(last_rows, dtype=torch.int64).to(device),
    )


def _group(
    seqs: Sequence[SeqInput],
    ids: list[int],
    rows: slice,
    q_len: int,
    cache: CacheShape,
    heads_per_kv: int,
    device: torch.device,
) -> AttentionGroup:
    block_size = cache.block_size
    width = max(-(-(seqs[i].start_pos + q_len) // block_size) for i in ids)
    tables = [list(seqs[i].block_table[:width]) for i in ids]
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
    kv_len = width * block_size
    key_pos = torch.arange(kv_len)
    # cache.rows gives [2, batch, kv_len, heads]; SDPA reads [2, batch, heads, kv_len].
    read_rows = cache.rows(table[:, key_pos // block_size], key_pos % block_size).transpose(2, 3)
    starts = torch.tensor([seqs[i].start_pos for i in ids], dtype=torch.int64)
    # Query row r of the folded GQA layout (see paged_attention) is token r % q_len.
    query_pos = starts[:, None] + torch.arange(q_len).repeat(heads_per_kv)[None, :]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]
    return AttentionGroup(
        rows=rows,
        batch=len(ids),
        q_len=q_len,
        kv_len=kv_len,
        read_rows=read_rows.flatten().to(device),
        mask=mask.unsqueeze(1).to(device),
    )


def write_kv(kv_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BatchPlan) -> None:
    """Store ``k``/``v`` (``[tokens, kv_heads, head_dim]``) into a layer's flattened cache."""
    head_dim = k.shape[-1]
    kv_rows.index_copy_(0, plan.write_rows[0], k.reshape(-1, head_dim))
    kv_rows.index_copy_(0, plan.write_rows[1], v.reshape(-1, head_dim))


def paged_attention(
    q: torch.Tensor, kv_rows: torch.Tensor, kv_heads: int, group: AttentionGroup
) -> torch.Tensor:
    """Attend ``q`` (``[batch * q_len, heads, head_dim]``) to the group's cached keys/values.

    ``kv_rows`` is one layer's cache flattened to ``[rows, head_dim]``; a single gather yields K
    and V already laid out for SDPA. Returns ``[batch * q_len, heads * head_dim]``. The query
    heads sharing a KV head are folded into the query length, so grouped-query attention needs
    no copy of K/V per query head.
    """
    b, q_len = group.batch, group.q_len
    heads, head_dim = q.shape[1], q.shape[2]
    per_kv = heads // kv_heads
    q = q.view(b, q_len, kv_heads, per_kv, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(b, kv_heads, per_kv * q_len, head_dim)
    kv = kv_rows.index_select(0, group.read_rows).view(2, b, kv_heads, group.kv_len, head_dim)
    out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=group.mask)
    out = out.view(b, kv_heads, per_kv, q_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(b * q_len, heads * head_dim)
